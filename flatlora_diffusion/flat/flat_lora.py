"""Flat-LoRA (Li et al., ICML 2025) as a small object that works in anyone's training loop.

    flat = FlatLora(models, sigma=0.1, schedule="cosine", total_steps=T, seed=0)
    for step in range(T):
        with flat.perturb(step):          # all micro-batches of optimizer step `step`
            loss = compute_loss(...); loss.backward()
        optimizer.step(); optimizer.zero_grad()

Inside `perturb(step)` every PEFT LoRA Linear computes with W + eps instead of W, where
eps_ij ~ N(0, sigma_t^2 ||W'_i||^2 / n) and W' = W + s·B·A is the merged weight (paper Eq. 7),
so the loss minimised is E_eps L(W + s·B·A + eps) (Eq. 6). The noise is regenerated from a seed
derived from (seed, step, rank, layer name); only the seeds and per-row stds are stored.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer

from .noisy_linear import noisy_linear

SCHEDULES = ("cosine", "constant")


class FlatLoraError(ValueError):
    """A LoRA layer or setting Flat-LoRA cannot handle correctly (never skipped silently)."""


@dataclass
class _Target:
    name: str
    layer: LoraLinear


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


def _named_models(models) -> dict[str, torch.nn.Module]:
    if isinstance(models, torch.nn.Module):
        return {"": models}
    if isinstance(models, Mapping):
        return dict(models)
    return {str(i): model for i, model in enumerate(models)}


def _check_supported(name: str, module: torch.nn.Module) -> None:
    if not isinstance(module, LoraLinear):
        raise FlatLoraError(f"{name}: Flat-LoRA supports LoRA on nn.Linear only, got {type(module).__name__}")
    if module.fan_in_fan_out:
        raise FlatLoraError(f"{name}: fan_in_fan_out LoRA layers (GPT-2 style Conv1D) are not supported")
    if not isinstance(module.get_base_layer(), torch.nn.Linear):
        raise FlatLoraError(f"{name}: base layer {type(module.get_base_layer()).__name__} is not nn.Linear")
    if module.lora_variant:
        raise FlatLoraError(f"{name}: LoRA variants ({', '.join(module.lora_variant)}: DoRA etc.) are not supported")


def find_lora_layers(models) -> list[tuple[str, LoraLinear]]:
    """Every PEFT LoRA layer under `models`, named '<model>.<module path>'; unsupported ones raise."""
    found = []
    for prefix, model in _named_models(models).items():
        for path, module in model.named_modules():
            if isinstance(module, LoraLayer):
                name = f"{prefix}.{path}" if prefix else path
                _check_supported(name, module)
                found.append((name, module))
    return found


class FlatLora:
    """Random weight perturbation of every LoRA Linear of `models`, one noise draw per step.

    Args:
        models: a module, a list of modules, or a {name: module} mapping (UNet, text encoders,
            any tree holding PEFT LoRA Linear layers).
        sigma: the paper's perturbation strength (0.10 for SDXL DreamBooth; 0 = plain LoRA).
        schedule: "cosine" (0 → sigma over training, as the paper) or "constant".
        total_steps: the number of optimizer steps the run takes (after accumulation).
        seed: the run's Flat-LoRA seed.
        rank: process rank; each rank draws its own noise. Defaults to torch.distributed's.
    """

    def __init__(self, models, sigma: float = 0.1, schedule: str = "cosine",
                 total_steps: int | None = None, seed: int = 0, rank: int | None = None):
        if sigma < 0:
            raise FlatLoraError(f"sigma must be >= 0, got {sigma}")
        if schedule not in SCHEDULES:
            raise FlatLoraError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if schedule == "cosine" and (total_steps is None or total_steps < 1):
            raise FlatLoraError(f"the cosine schedule needs total_steps >= 1, got {total_steps}")
        self.sigma, self.schedule, self.total_steps, self.seed = float(sigma), schedule, total_steps, int(seed)
        self.rank = _default_rank() if rank is None else int(rank)
        self._targets = [_Target(name, layer) for name, layer in find_lora_layers(models)]
        if not self._targets:
            raise FlatLoraError("no PEFT LoRA layers found in the given models")
        self._active = False

    @property
    def layer_names(self) -> list[str]:
        """The layers perturb() perturbs now (see _perturbed_targets)."""
        return [target.name for target in self._perturbed_targets()]

    def _perturbed_targets(self) -> list[_Target]:
        """The layers whose LoRA trains; all of them when none trains.

        A layer whose LoRA parameters are all frozen (text encoder 1 past the penultimate hidden
        state, which SDXL never reads) gets no gradient, so noise there cannot change anything the
        training sees: it is skipped. With no trainable LoRA at all (evaluation: the perturbed loss
        of a loaded, frozen LoRA, as evaluation.dreambooth.sharpness measures it) every layer is
        perturbed. Decided at every perturb(), so freezing after construction is seen.
        """
        trainable = [target for target in self._targets if _lora_trainable(target.layer)]
        return trainable or self._targets

    def sigma_at(self, step: int) -> float:
        return sigma_at(step, self.sigma, self.total_steps or 1, self.schedule)

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
        try:
            with contextlib.ExitStack() as stack:
                for target in self._perturbed_targets():
                    seed = layer_seed(self.seed, step, self.rank, target.name)
                    row_std = functools.partial(self._step_row_std, target, sigma_t)
                    stack.enter_context(_compute_with_noise(target.layer.get_base_layer(), row_std, seed))
                yield
        finally:
            self._active = False

    def _step_row_std(self, target: _Target, sigma_t: float) -> torch.Tensor:
        """The layer's row stds for this step, in the weight's dtype (cast once, not per forward/backward;
        layer_noise would cast them anyway), in fp32 maths whatever autocast is active around the call."""
        weight = target.layer.get_base_layer().weight
        with torch.autocast(weight.device.type, enabled=False):
            return self._row_std(target, sigma_t).to(weight.device, weight.dtype)

    @torch.no_grad()
    def _row_std(self, target: _Target, sigma_t: float) -> torch.Tensor:
        """sigma_t·||W'_i||/sqrt(n) per output row, from the current merged weight, in fp32."""
        weight = target.layer.get_base_layer().weight
        row_sq = self._merged_row_sq_norms(target, weight)
        return row_sq.clamp_min(0).sqrt_().mul_(sigma_t / math.sqrt(weight.shape[1]))  # the cache stays intact

    def _merged_row_sq_norms(self, target: _Target, weight: torch.Tensor) -> torch.Tensor:
        # ||W + D||^2 per row = ||W||^2 + 2<W, D> + ||D||^2 with D = Bs·A (Bs = scaled B, out x r);
        # 2<W, D> + ||D||^2 = rowsum(Bs ∘ (2·W A^T + Bs·AA^T)) costs O(out·in·r), one fp32 copy of W
        # at a time, and a handful of kernels per layer (this runs for every LoRA layer once per step).
        # ||W||^2 is computed afresh every step, never cached: PEFT's merge()/unmerge() change W in
        # place (weight.data += delta) without changing its data_ptr or _version, so no cheap key
        # notices; a merged layer's W already is W' (its delta factors are then None).
        weight_fp32 = weight.float()
        base_sq_norms = torch.linalg.vector_norm(weight_fp32, dim=1).square_()
        b_scaled, a = _active_delta_factors(target.layer)
        if b_scaled is None:
            return base_sq_norms
        inner = torch.addmm(weight_fp32 @ a.t(), b_scaled, a @ a.t(), beta=2.0)
        return torch.linalg.vecdot(b_scaled, inner).add_(base_sq_norms)


def _lora_trainable(layer: LoraLayer) -> bool:
    return any(param.requires_grad for name, param in layer.named_parameters() if "lora_" in name)


def _active_delta_factors(layer: LoraLinear) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(s·B, A) of the active, unmerged adapters stacked along the rank: D = (s·B) @ A."""
    if layer.merged or layer.disable_adapters:
        return None, None  # merged: W already holds s·B·A; disabled: W' = W
    bs, as_ = [], []
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            as_.append(layer.lora_A[adapter].weight.float())
            bs.append(layer.lora_B[adapter].weight.float() * layer.scaling[adapter])
    if not bs:
        return None, None
    if len(bs) == 1:  # the usual case: no concatenation copies
        return bs[0], as_[0]
    return torch.cat(bs, 1), torch.cat(as_, 0)


@contextlib.contextmanager
def _compute_with_noise(base: torch.nn.Linear, row_std_of: Callable[[], torch.Tensor], seed: int) -> Iterator[None]:
    """Route `base`'s forward through the noisy linear for the block, then restore it.

    The row stds are computed at the layer's first forward in the block and kept for the rest of
    it (later micro-batches, the recomputed forward of gradient checkpointing): once per step, and
    on a GPU their small kernels are queued while the model's large ones run, instead of all
    layers' at the start of the step while the GPU waits.

    An instance attribute shadows the class's forward only inside the block; hooks registered on
    the module still run, the module's parameters and state_dict keys are untouched.
    """
    row_std: list[torch.Tensor] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not row_std:
            row_std.append(row_std_of())
        return noisy_linear(x, base, row_std[0], seed)

    base.forward = forward
    try:
        yield
    finally:
        del base.forward


def _default_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0
