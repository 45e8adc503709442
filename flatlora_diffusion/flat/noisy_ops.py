"""The perturbed base layers: y = x ∗ (W + eps) + b for a Linear or a Conv2d, eps regenerated from a seed.

Nothing is written into W (the reference code adds eps in place and subtracts it later, which
does not restore bf16/fp16 weights), and by default nothing weight-sized is kept between forward
and backward: backward regenerates the same eps from the same seed (paper Sec. 4.3, "store
seeds"). With a noise buffer (NoiseSlot.buffered) the first W + eps of the step is kept instead
and reused by every later forward, backward and recompute of that step: same values, one draw.

The layers are torch.library custom ops, so torch.compile treats them as opaque calls: the noise
generation (a torch.Generator, Python threads) stays out of the traced graph, and the per-step
state reaches them as tensors whose values change in place (the layer's seed as a 0-d int64
tensor, its row stds), never as Python numbers, which dynamo would guard on and recompile for.
`key` is a constant per layer naming its NoiseSlot (draw counter, buffer).
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .gaussian import perturbed_weight, standard_normal

_keys = itertools.count(1)
_SLOTS: weakref.WeakValueDictionary[int, NoiseSlot] = weakref.WeakValueDictionary()


@dataclass(eq=False)
class NoiseSlot:
    """A perturbed layer's per-step state, read by its (persistent) noisy forward."""

    seed: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))  # this step's seed
    row_std: torch.Tensor | None = None  # (out,) fp32 on the weight's device, this step's stds
    buffered: bool = False  # keep W + eps for the whole step (one draw per step)
    draws: int = 0  # full-size noise draws so far (for tests and benchmarks)
    key: int = field(default_factory=lambda: next(_keys))
    _kept: torch.Tensor | None = None
    _kept_seed: int | None = None

    def __post_init__(self):
        _SLOTS[self.key] = self

    def drop_buffer(self) -> None:
        self._kept = self._kept_seed = None


def _noisy_weight(weight: torch.Tensor, row_std: torch.Tensor, seed: torch.Tensor, key: int) -> torch.Tensor:
    slot = _SLOTS[key]
    seed_value = int(seed.item())
    if slot._kept is not None and slot._kept_seed == seed_value:
        return slot._kept
    noisy = perturbed_weight(weight, row_std, seed_value)
    slot.draws += 1
    if slot.buffered:
        slot._kept, slot._kept_seed = noisy, seed_value
    return noisy


# ------------------------------------------------------------------ Linear

@torch.library.custom_op("flatlora::linear", mutates_args=())
def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_std: torch.Tensor,
            seed: torch.Tensor, key: int) -> torch.Tensor:
    noisy = _noisy_weight(weight, row_std, seed, key).to(x.dtype)
    return F.linear(x, noisy, None if bias is None else bias.to(x.dtype))


@_linear.register_fake
def _(x, weight, bias, row_std, seed, key):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("flatlora::linear_grad_input", mutates_args=())
def _linear_grad_input(grad: torch.Tensor, weight: torch.Tensor, row_std: torch.Tensor, seed: torch.Tensor,
                       key: int) -> torch.Tensor:
    return grad.matmul(_noisy_weight(weight, row_std, seed, key).to(grad.dtype))


@_linear_grad_input.register_fake
def _(grad, weight, row_std, seed, key):
    return grad.new_empty((*grad.shape[:-1], weight.shape[1]))


def _setup_linear(ctx, inputs, output):
    x, weight, bias, row_std, seed, key = inputs
    ctx.key, ctx.has_bias = key, bias is not None
    # x is needed only for a weight gradient; frozen bases (the LoRA case) do not keep it.
    ctx.save_for_backward(weight, row_std, seed, x if weight.requires_grad else None)


def _backward_linear(ctx, grad):
    weight, row_std, seed, x = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _linear_grad_input(grad, weight, row_std, seed, ctx.key)
    if ctx.needs_input_grad[1]:
        grad_w = grad.reshape(-1, grad.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1])).to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, grad_w, grad_b, None, None, None


_linear.register_autograd(_backward_linear, setup_context=_setup_linear)


# ------------------------------------------------------------------ Conv2d

@torch.library.custom_op("flatlora::conv2d", mutates_args=())
def _conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_std: torch.Tensor,
            seed: torch.Tensor, key: int, stride: list[int], padding: list[int],
            dilation: list[int]) -> torch.Tensor:
    noisy = _noisy_weight(weight, row_std, seed, key).to(x.dtype)
    return F.conv2d(x, noisy, None if bias is None else bias.to(x.dtype), stride, padding, dilation)


@_conv2d.register_fake
def _(x, weight, bias, row_std, seed, key, stride, padding, dilation):
    return F.conv2d(x, torch.empty_like(weight, dtype=x.dtype), None, stride, padding, dilation)


@torch.library.custom_op("flatlora::conv2d_grad_input", mutates_args=())
def _conv2d_grad_input(grad: torch.Tensor, weight: torch.Tensor, row_std: torch.Tensor, seed: torch.Tensor,
                       key: int, input_size: list[int], stride: list[int], padding: list[int],
                       dilation: list[int]) -> torch.Tensor:
    noisy = _noisy_weight(weight, row_std, seed, key).to(grad.dtype)
    return torch.nn.grad.conv2d_input(list(input_size), noisy, grad, stride, padding, dilation)


@_conv2d_grad_input.register_fake
def _(grad, weight, row_std, seed, key, input_size, stride, padding, dilation):
    return grad.new_empty(tuple(input_size))


def _setup_conv2d(ctx, inputs, output):
    x, weight, bias, row_std, seed, key, stride, padding, dilation = inputs
    ctx.key, ctx.has_bias, ctx.geometry = key, bias is not None, (stride, padding, dilation)
    ctx.input_size = tuple(x.shape)
    ctx.save_for_backward(weight, row_std, seed, x if weight.requires_grad else None)


def _backward_conv2d(ctx, grad):
    weight, row_std, seed, x = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _conv2d_grad_input(grad, weight, row_std, seed, ctx.key, ctx.input_size, *ctx.geometry)
    if ctx.needs_input_grad[1]:
        grad_w = torch.nn.grad.conv2d_weight(x, weight.shape, grad, *ctx.geometry).to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad.sum((0, 2, 3))
    return grad_x, grad_w, grad_b, None, None, None, None, None, None


_conv2d.register_autograd(_backward_conv2d, setup_context=_setup_conv2d)


# ------------------------------------------------------------------ what the layers call

def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the base layer would compute in: autocast's when it is on, else the input's.

    The ops compute with autocast off in exactly this dtype, so their fake (compile-time) outputs
    have the real outputs' dtype.
    """
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def noisy_linear(x: torch.Tensor, base: torch.nn.Linear, slot: NoiseSlot) -> torch.Tensor:
    x = x.to(_compute_dtype(x))
    with torch.autocast(x.device.type, enabled=False):
        return _linear(x, base.weight, base.bias, slot.row_std, slot.seed, slot.key)


def noisy_conv2d(x: torch.Tensor, base: torch.nn.Conv2d, slot: NoiseSlot) -> torch.Tensor:
    x = x.to(_compute_dtype(x))
    with torch.autocast(x.device.type, enabled=False):
        return _conv2d(x, base.weight, base.bias, slot.row_std, slot.seed, slot.key,
                       list(base.stride), list(base.padding), list(base.dilation))


def layer_noise(weight: torch.Tensor, row_std: torch.Tensor, seed: int) -> torch.Tensor:
    """eps = row_std_i·z_ij in fp32, the same z as perturbed_weight (for explicit W + eps references)."""
    z = standard_normal(tuple(weight.shape), seed, weight.device)
    return z.mul_(row_std.float().reshape(-1, *([1] * (weight.dim() - 1))))
