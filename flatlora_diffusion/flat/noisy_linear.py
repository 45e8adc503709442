"""The perturbed base linear: y = x (W + eps)^T + b, with eps regenerated from a seed.

Nothing is written into W (the reference code adds eps in place and subtracts it later, which
does not restore bf16/fp16 weights), and nothing weight-sized is kept between forward and
backward: backward regenerates the same eps from the same seed (paper Sec. 4.3, "store seeds").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_GENERATORS: dict[torch.device, torch.Generator] = {}


def _seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    """A private generator of `device`, reseeded: the same stream as a fresh one seeded with `seed`
    (manual_seed resets the engine and any cached normal sample), without creating one per call."""
    generator = _GENERATORS.get(device)
    if generator is None:
        generator = _GENERATORS[device] = torch.Generator(device=device)
    return generator.manual_seed(seed)


def layer_noise(weight: torch.Tensor, row_std: torch.Tensor, seed: int) -> torch.Tensor:
    """eps_ij = row_std_i * z_ij, z ~ N(0, 1) drawn from a private generator seeded with `seed`.

    Drawn in the weight's dtype on the weight's device (no fp32 copy), never from the global RNG.
    """
    generator = _seeded_generator(weight.device, seed)
    noise = torch.randn(weight.shape, generator=generator, device=weight.device, dtype=weight.dtype)
    return noise.mul_(row_std.to(weight.dtype).unsqueeze(1))


def perturbed_weight(weight: torch.Tensor, row_std: torch.Tensor, seed: int) -> torch.Tensor:
    """W + eps in one weight-sized buffer: randn, scale rows, add W, all in place.

    Bit-identical to `weight + layer_noise(weight, row_std, seed)` (the same two roundings in
    the same order), with one allocation and no second weight-sized temporary.
    """
    return layer_noise(weight, row_std, seed).add_(weight)


class NoisyLinearFunction(torch.autograd.Function):
    """F.linear with the weight replaced by W + eps(seed); gradients as if W + eps were real."""

    @staticmethod
    def forward(ctx, x, weight, bias, row_std, seed):
        out = F.linear(x, perturbed_weight(weight, row_std, seed), bias)
        ctx.seed = seed
        ctx.has_bias = bias is not None
        # x is needed only for a weight gradient; frozen bases (the LoRA case) do not keep it.
        ctx.save_for_backward(weight, row_std, x if weight.requires_grad else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, row_std, x = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(perturbed_weight(weight, row_std, ctx.seed).to(grad_out.dtype))
        if ctx.needs_input_grad[1]:
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, None, None


def noisy_linear(x: torch.Tensor, linear: torch.nn.Linear, row_std: torch.Tensor, seed: int) -> torch.Tensor:
    return NoisyLinearFunction.apply(x, linear.weight, linear.bias, row_std, seed)
