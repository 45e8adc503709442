"""Flat-LoRA (Li et al., ICML 2025) as a small object that works in anyone's training loop.

    flat = FlatLora(models, sigma=0.1, schedule="cosine", total_steps=T, seed=0)
    for step in range(T):
        with flat.perturb(step):          # all micro-batches of optimizer step `step`
            loss = compute_loss(...); loss.backward()
        optimizer.step(); optimizer.zero_grad()

Inside `perturb(step)` every PEFT LoRA Linear and Conv2d computes with W + eps instead of W, where
eps_ij ~ N(0, sigma_t^2 ||W'_i||^2 / n) and W' = W + s·B·A is the merged weight (paper Eq. 7; a
conv's row i is its output filter, n = in·kh·kw), so the loss minimised is E_eps L(W + s·B·A + eps)
(Eq. 6). The noise is regenerated from a seed derived from (seed, step, rank, layer name); only
the seeds and per-row stds are stored, unless noise_buffer=True keeps each layer's W + eps for
the step (one draw per layer per step, one weight copy per layer of memory).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Iterator

import torch

from .targets import FlatLoraError, Target, find_lora_layers, lora_trainable, make_target, merged_row_sq_norms

__all__ = ["FlatLora", "FlatLoraError", "find_lora_layers", "layer_seed", "sigma_at"]

SCHEDULES = ("cosine", "constant")


def sigma_at(step: int, sigma: float, total_steps: int, schedule: str = "cosine") -> float:
    """Noise scale at 0-based optimizer step `step` of `total_steps`.

    cosine: sigma·0.5·(1 − cos(π·t/T)) with t = step + 1, the number of the optimizer step being
    taken, so the ramp reaches sigma exactly at the last step (the reference code counts from 0
    and never gets there, and under DDP stops far short of it).
    """
    if schedule == "constant":
        return float(sigma)
    progress = min(step + 1, total_steps) / total_steps
    return float(sigma) * 0.5 * (1.0 - math.cos(math.pi * progress))


def layer_seed(seed: int, step: int, rank: int, name: str) -> int:
    """A 63-bit seed that depends only on (seed, step, rank, layer name), never on order or time."""
    digest = hashlib.blake2b(f"{seed}/{step}/{rank}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class FlatLora:
    """Random weight perturbation of every LoRA Linear/Conv2d of `models`, one noise sample per step.

    Args:
        models: a module, a list of modules, or a {name: module} mapping (UNet, text encoders,
            any tree holding PEFT LoRA Linear or Conv2d layers).
        sigma: the paper's perturbation strength (0.10 for SDXL DreamBooth; 0 = plain LoRA).
        schedule: "cosine" (0 → sigma over training, as the paper) or "constant".
        total_steps: the number of optimizer steps the run takes (after accumulation).
        seed: the run's Flat-LoRA seed.
        rank: process rank; each rank draws its own noise. Defaults to torch.distributed's.
        noise_buffer: keep each layer's W + eps (weight dtype) from its first use in a step to the
            end of perturb(): one draw per layer per step whatever the gradient accumulation and
            checkpointing, for noise_buffer_bytes() of memory. Same values as without it.
    """

    def __init__(self, models, sigma: float = 0.1, schedule: str = "cosine",
                 total_steps: int | None = None, seed: int = 0, rank: int | None = None,
                 noise_buffer: bool = False):
        if sigma < 0:
            raise FlatLoraError(f"sigma must be >= 0, got {sigma}")
        if schedule not in SCHEDULES:
            raise FlatLoraError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if schedule == "cosine" and (total_steps is None or total_steps < 1):
            raise FlatLoraError(f"the cosine schedule needs total_steps >= 1, got {total_steps}")
        self.sigma, self.schedule, self.total_steps, self.seed = float(sigma), schedule, total_steps, int(seed)
        self.rank = _default_rank() if rank is None else int(rank)
        self.noise_buffer = bool(noise_buffer)
        self._targets = [make_target(name, layer, self.noise_buffer) for name, layer in find_lora_layers(models)]
        if not self._targets:
            raise FlatLoraError("no PEFT LoRA layers found in the given models")
        self._active = False

    @property
    def layer_names(self) -> list[str]:
        """The layers perturb() perturbs now (see _perturbed_targets)."""
        return [target.name for target in self._perturbed_targets()]

    def sigma_at(self, step: int) -> float:
        return sigma_at(step, self.sigma, self.total_steps or 1, self.schedule)

    def draw_counts(self) -> dict[str, int]:
        """Full-size noise draws so far, per layer (forward, backward and recomputes all count)."""
        return {target.name: target.slot.draws for target in self._targets}

    def noise_buffer_bytes(self) -> int:
        """What noise_buffer=True keeps during a step: one W + eps per perturbed layer."""
        return sum(t.base.weight.numel() * t.base.weight.element_size() for t in self._perturbed_targets())

    @contextlib.contextmanager
    def perturb(self, step: int) -> Iterator[None]:
        """Compute with W + eps for the whole block (forward and backward of every micro-batch).

        Call backward inside the block: gradient checkpointing recomputes the forward there and
        must see the same eps. With sigma_t = 0 nothing is changed at all.
        """
        if self._active:
            raise RuntimeError("FlatLora.perturb() is already active; it cannot be nested")
        sigma_t = self.sigma_at(step)
        if sigma_t == 0.0:
            yield
            return
        self._active = True
        targets = self._perturbed_targets()
        try:
            for target in targets:
                self._prepare(target, step, sigma_t)
                # An instance attribute shadows the class's forward only inside the block; hooks
                # still run, parameters and state_dict keys are untouched. The same function object
                # every step, reading the slot's tensors: torch.compile sees one unchanged forward.
                target.base.forward = target.forward
            yield
        finally:
            for target in targets:
                vars(target.base).pop("forward", None)
                target.slot.drop_buffer()
            self._active = False

    def _perturbed_targets(self) -> list[Target]:
        """The layers whose LoRA trains; all of them when none trains.

        A layer whose LoRA parameters are all frozen (text encoder 1 past the penultimate hidden
        state, which SDXL never reads) gets no gradient, so noise there cannot change anything the
        training sees: it is skipped. With no trainable LoRA at all (evaluation: the perturbed loss
        of a loaded, frozen LoRA, as evaluation.dreambooth.sharpness measures it) every layer is
        perturbed. Decided at every perturb(), so freezing after construction is seen.
        """
        trainable = [target for target in self._targets if lora_trainable(target.layer)]
        return trainable or self._targets

    def _prepare(self, target: Target, step: int, sigma_t: float) -> None:
        """This step's seed and row stds, written into the layer's slot in place."""
        slot = target.slot
        slot.drop_buffer()
        slot.seed.fill_(layer_seed(self.seed, step, self.rank, target.name))
        row_std = self._row_std(target, sigma_t)
        if slot.row_std is None or slot.row_std.shape != row_std.shape or slot.row_std.device != row_std.device:
            slot.row_std = row_std
        else:
            slot.row_std.copy_(row_std)

    @torch.no_grad()
    def _row_std(self, target: Target, sigma_t: float) -> torch.Tensor:
        """sigma_t·||W'_i||/sqrt(n) per output row (filter), from the current merged weight, in fp32
        whatever autocast is active around the call."""
        weight = target.base.weight
        with torch.autocast(weight.device.type, enabled=False):
            row_sq = merged_row_sq_norms(target.layer)
        n = weight[0].numel()
        return row_sq.clamp_min_(0).sqrt_().mul_(sigma_t / math.sqrt(n))


def _default_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0
