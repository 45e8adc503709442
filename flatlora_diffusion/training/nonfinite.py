"""Non-finite steps: an optimizer step whose loss or gradient is NaN/inf is skipped, not applied.

A skipped step makes no optimizer, LR-scheduler or EMA update and its gradients are dropped. It
still uses up its step index: the data stream, the diffusion noise and the Flat-LoRA noise are
indexed by step, so the next step sees new samples (a broken image would otherwise come back
forever) and `--max_train_steps` counts attempted steps. The LR schedule advances only with
applied updates, as accelerate does for the GradScaler's skips. Under fp16 the GradScaler's own
skips (an overflow at the current loss scale) are skipped steps too. After `limit` skipped steps
in a row training stops with one error naming the step; the weights never saw a bad update, so
every checkpoint written is a good one. The counts are saved in checkpoints: resume is exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from flatlora_diffusion.errors import UserError

from .checkpoint import list_complete_checkpoints
from .multiprocess import any_rank


@dataclass
class NonfiniteGuard:
    """Counts skipped steps; `observe` after every step, `stop_if_stuck` before the next."""

    limit: int
    in_a_row: int = 0
    total: int = 0
    last_skipped: bool = False
    first_of_streak: int = 0

    def observe(self, step: int, applied: bool) -> None:
        self.last_skipped = not applied
        if applied:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row == 1:
            self.first_of_streak = step

    def metrics(self) -> dict:
        """Fields of this step's metrics.jsonl line."""
        return {"skipped": self.last_skipped, "skipped_steps": self.total}

    def postfix(self) -> dict:
        """Progress-bar fields: shown once any step was skipped."""
        return {"skipped": self.total} if self.total else {}

    def stop_if_stuck(self, step: int, output_dir: Path) -> None:
        if self.in_a_row < self.limit:
            return
        kept = list_complete_checkpoints(output_dir)
        where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was saved yet"
        raise UserError(f"training stopped at step {step}: {self.in_a_row} steps in a row (since step "
                        f"{self.first_of_streak}) had a NaN/inf loss or gradient and were skipped; {where}. "
                        "Try a lower --learning_rate, --mixed_precision bf16 or an fp16-safe VAE, "
                        "and check the images")

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            if name != "limit":  # the limit is this session's flag
                setattr(self, name, value)


def update_if_finite(accelerator: Accelerator, optimizer, lr_scheduler, ema, loss: torch.Tensor,
                     max_grad_norm: float) -> bool:
    """Clip, then apply the optimizer, LR-scheduler and EMA update unless the step is non-finite.

    Returns whether the update was applied; the gradients are zeroed either way.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    applied = gradients_are_finite(accelerator, loss, params, max_grad_norm)
    if applied:
        optimizer.step()
        applied = not accelerator.optimizer_step_was_skipped  # fp16: the GradScaler's own skip
    else:
        skip_step(accelerator)
    if applied:
        lr_scheduler.step()
        if ema is not None:
            ema.update()
    optimizer.zero_grad(set_to_none=True)
    return applied


def gradients_are_finite(accelerator: Accelerator, loss: torch.Tensor, params: list[torch.nn.Parameter],
                         max_grad_norm: float) -> bool:
    """Clip (when asked) and check the loss and the gradient norm; every rank gets the same answer.

    Under fp16 the gradients are unscaled first (clip does it), so the norm is the true one and
    an overflow at the current loss scale shows as inf here, exactly when the GradScaler would skip.
    """
    if max_grad_norm > 0:
        # the optimizer's own list: walking every module's parameters cost ~4 ms a step (profiled)
        norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    else:
        accelerator.unscale_gradients()
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    bad = not bool(torch.isfinite(loss).all() and torch.isfinite(torch.as_tensor(norm)).all())
    return not any_rank(accelerator, bad)  # a NaN on one rank skips the step on all


def skip_step(accelerator: Accelerator) -> None:
    """Drop this step's update; under fp16 still let the GradScaler lower its scale (as its own skip does)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and accelerator.mixed_precision == "fp16":
        scaler.update()  # the inf found while unscaling halves the scale; also resets its per-step state

