"""The PEFT LoRA layers Flat-LoRA perturbs, and the filter-wise norms of their merged weights.

Supported: LoRA on nn.Linear and on nn.Conv2d (LoCon). A conv weight (out, in, kh, kw) is seen as
out rows of n = in·kh·kw numbers: one std per output filter (paper Eq. 7 per filter), and its LoRA
delta is s·B∘A = (s·B as out x r) @ (A as r x n), since PEFT's lora_B is a 1x1 conv. Anything
else (DoRA and other variants, fan_in_fan_out, Conv1d/Conv3d, grouped or non-zero-padded convs,
embeddings) is refused with a FlatLoraError, never skipped silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from peft.tuners.lora import Conv2d as LoraConv2d
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer

from .noisy_ops import NoiseSlot, noisy_conv2d, noisy_linear


class FlatLoraError(ValueError):
    """A LoRA layer or setting Flat-LoRA cannot handle correctly (never skipped silently)."""


@dataclass(eq=False)
class Target:
    """One perturbed layer: its name, the PEFT layer, and the noisy forward its base layer takes."""

    name: str
    layer: LoraLinear | LoraConv2d
    slot: NoiseSlot
    forward: Callable[[torch.Tensor], torch.Tensor]  # built once: the same object every step

    @property
    def base(self) -> torch.nn.Module:
        return self.layer.get_base_layer()


def make_target(name: str, layer: LoraLinear | LoraConv2d, buffered: bool) -> Target:
    slot = NoiseSlot(buffered=buffered)
    noisy = noisy_conv2d if isinstance(layer, LoraConv2d) else noisy_linear
    return Target(name, layer, slot, _persistent_forward(noisy, layer.get_base_layer(), slot))


def _persistent_forward(noisy, base: torch.nn.Module, slot: NoiseSlot):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return noisy(x, base, slot)

    return forward


def named_models(models) -> dict[str, torch.nn.Module]:
    if isinstance(models, torch.nn.Module):
        return {"": models}
    if isinstance(models, Mapping):
        return dict(models)
    return {str(i): model for i, model in enumerate(models)}


def _check_supported(name: str, module: torch.nn.Module) -> None:
    if isinstance(module, LoraLinear):
        if module.fan_in_fan_out:
            raise FlatLoraError(f"{name}: fan_in_fan_out LoRA layers (GPT-2 style Conv1D) are not supported")
        if not isinstance(module.get_base_layer(), torch.nn.Linear):
            raise FlatLoraError(f"{name}: base layer {type(module.get_base_layer()).__name__} is not nn.Linear")
    elif isinstance(module, LoraConv2d):
        base = module.get_base_layer()
        if type(base) is not torch.nn.Conv2d:
            raise FlatLoraError(f"{name}: base layer {type(base).__name__} is not nn.Conv2d")
        if base.groups != 1 or base.padding_mode != "zeros" or isinstance(base.padding, str):
            raise FlatLoraError(f"{name}: only Conv2d with groups=1, zero padding given as numbers is supported "
                                f"(got groups={base.groups}, padding={base.padding!r}, mode {base.padding_mode!r})")
    else:
        raise FlatLoraError(f"{name}: Flat-LoRA supports LoRA on nn.Linear and nn.Conv2d only, "
                            f"got {type(module).__name__}")
    if module.lora_variant:
        raise FlatLoraError(f"{name}: LoRA variants ({', '.join(module.lora_variant)}: DoRA etc.) are not supported")


def find_lora_layers(models) -> list[tuple[str, LoraLinear | LoraConv2d]]:
    """Every PEFT LoRA layer under `models`, named '<model>.<module path>'; unsupported ones raise."""
    found = []
    for prefix, model in named_models(models).items():
        for path, module in model.named_modules():
            if isinstance(module, LoraLayer):
                name = f"{prefix}.{path}" if prefix else path
                _check_supported(name, module)
                found.append((name, module))
    return found


def lora_trainable(layer: LoraLayer) -> bool:
    return any(param.requires_grad for name, param in layer.named_parameters() if "lora_" in name)


@torch.no_grad()
def merged_row_sq_norms(layer: LoraLinear | LoraConv2d) -> torch.Tensor:
    """||W'_i||^2 per output row (filter) in fp32, W' = W + s·B∘A, from the current weights.

    ||W + D||^2 = ||W||^2 + 2<W, D> + ||D||^2 per row with D = Bs·A (Bs = scaled B, out x r), and
    2<W, D> + ||D||^2 = rowsum(Bs ∘ (2·W A^T + Bs·AA^T)): O(out·n·r), one fp32 copy of W at a time,
    a handful of kernels per layer. ||W||^2 is computed afresh every step, never cached: PEFT's
    merge()/unmerge() change W in place (weight.data += delta) without changing its data_ptr or
    _version, so no cheap key notices; a merged layer's W already is W' (its factors are None).
    """
    weight = layer.get_base_layer().weight
    weight_fp32 = weight.reshape(weight.shape[0], -1).float()
    base_sq_norms = torch.linalg.vector_norm(weight_fp32, dim=1).square_()
    b_scaled, a = _active_delta_factors(layer)
    if b_scaled is None:
        return base_sq_norms
    inner = torch.addmm(weight_fp32 @ a.t(), b_scaled, a @ a.t(), beta=2.0)
    return torch.linalg.vecdot(b_scaled, inner).add_(base_sq_norms)


def _active_delta_factors(layer: LoraLayer) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(s·B, A) of the active, unmerged adapters stacked along the rank, as matrices: D = (s·B) @ A."""
    if layer.merged or layer.disable_adapters:
        return None, None  # merged: W already holds s·B·A (PEFT then runs the base alone); disabled: W' = W
    bs, as_ = [], []
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            a = layer.lora_A[adapter].weight.float()
            b = layer.lora_B[adapter].weight.float()
            as_.append(a.reshape(a.shape[0], -1))
            bs.append(b.reshape(b.shape[0], -1) * layer.scaling[adapter])  # conv lora_B is 1x1: (out, r)
    if not bs:
        return None, None
    if len(bs) == 1:  # the usual case: no concatenation copies
        return bs[0], as_[0]
    return torch.cat(bs, 1), torch.cat(as_, 0)
