"""Flat-LoRA on PEFT LoRA Conv2d (LoCon): filter-wise noise, with the Linear path's guarantees."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from flatlora_diffusion import FlatLora
from flatlora_diffusion.flat.flat_lora import find_lora_layers, layer_seed
from flatlora_diffusion.flat.gaussian import perturbed_weight
from flatlora_diffusion.flat.noisy_ops import layer_noise
from flatlora_diffusion.lora.attach import lora_parameters
from tests.flat.test_flat_lora import grads_of

CONV_LORA = LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, target_modules=["down", "mix", "head"])


class ConvToy(torch.nn.Module):
    """A strided, padded 3x3 conv, a 1x1 conv and a Linear head, all with LoRA."""

    def __init__(self, channels=16):
        super().__init__()
        self.down = torch.nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.mix = torch.nn.Conv2d(channels, channels, 1, bias=False)
        self.head = torch.nn.Linear(channels, 5)

    def forward(self, x):
        h = torch.tanh(self.mix(torch.tanh(self.down(x))))
        return self.head(h.mean((2, 3)))


def conv_toy(dtype=torch.float32, channels=16):
    torch.manual_seed(0)
    model = inject_adapter_in_model(CONV_LORA, ConvToy(channels))
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" not in name:
            param.data = param.data.to(dtype)
    return model


def images(seed=1, batch=3):
    return torch.randn(batch, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def conv_loss(model, x=None, dtype=torch.float32):
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        return model(images() if x is None else x).float().square().mean()


def _merged_filters(layer) -> torch.Tensor:
    weight = layer.get_base_layer().weight.detach().float()
    return (weight + layer.get_delta_weight("default").float()).flatten(1)


def test_conv_layers_are_found_with_filter_wise_stds():
    model = conv_toy()
    flat = FlatLora(model, sigma=0.3, schedule="constant")
    assert flat.layer_names == ["down", "mix", "head"]
    for target in flat._targets[:2]:
        merged = _merged_filters(target.layer)  # PEFT's own B∘A: W' per output filter
        n = merged.shape[1]
        assert n == target.base.in_channels * math.prod(target.base.kernel_size)
        expected = 0.3 * merged.norm(dim=1) / math.sqrt(n)
        assert torch.allclose(flat._row_std(target, 0.3), expected, rtol=1e-5)
        assert not torch.allclose(expected, 0.3 * target.base.weight.flatten(1).norm(dim=1) / math.sqrt(n))


def test_conv_noise_has_the_filter_std():
    std = torch.rand(64) + 0.5
    eps = perturbed_weight(torch.zeros(64, 64, 3, 3), std, 5).flatten(1)  # n = 576 per filter
    assert eps.mean(1).abs().max() < 5 * std.max() / math.sqrt(576)
    assert ((eps.std(1) / std) - 1).abs().max() < 0.2


def _explicit_reference(model, flat, step):
    ref = copy.deepcopy(model)
    sigma_t = flat.sigma_at(step)
    for target, (name, layer) in zip(flat._targets, find_lora_layers(ref)):
        weight = layer.get_base_layer().weight
        eps = layer_noise(weight, flat._row_std(target, sigma_t), layer_seed(flat.seed, step, flat.rank, name))
        weight.data += eps.to(weight.dtype)
    return ref


def test_conv_gradients_match_an_explicit_w_plus_eps_conv():
    model = conv_toy()
    loss0, _ = grads_of(model, conv_loss)
    flat = FlatLora(model, sigma=0.3, total_steps=5, seed=2)
    with flat.perturb(3):
        loss, grads = grads_of(model, conv_loss)
    ref_loss, ref_grads = grads_of(_explicit_reference(model, flat, 3), conv_loss)
    assert not torch.allclose(loss, loss0)
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-7)
    assert grads.keys() == ref_grads.keys()
    for key in ref_grads:
        assert torch.allclose(grads[key], ref_grads[key], rtol=1e-4, atol=1e-7), key
    assert grads_of(model, conv_loss)[0] == loss0  # outside perturb: plain LoRA again


def test_conv_input_gradient_matches_the_reference():
    """The noisy conv's own backward (grad of the input image), not only the LoRA weights'."""
    model = conv_toy()
    flat = FlatLora(model, sigma=0.3, schedule="constant", seed=4)
    grads = []
    x = images()
    for which in ("flat", "ref"):
        xi = x.clone().requires_grad_(True)
        if which == "flat":
            with flat.perturb(0):
                conv_loss(model, xi).backward()
        else:
            ref = _explicit_reference(model, flat, 0)
            conv_loss(ref, xi).backward()
        grads.append(xi.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv_base_weights_bit_identical_and_seeded(dtype):
    model = conv_toy(dtype)
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    flat = FlatLora(model, sigma=0.15, total_steps=10, seed=0)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    state = torch.get_rng_state()
    for step in range(10):
        with flat.perturb(step):
            conv_loss(model, dtype=dtype).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" not in n)
    outs = []
    for step in (1, 1, 2):
        with torch.no_grad(), flat.perturb(step):
            outs.append(model(images().to(dtype)))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_conv_keeps_no_weight_sized_tensor_between_forward_and_backward():
    model = conv_toy(channels=32)
    weights = {p.data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for n, p in model.named_parameters() if "base_layer.weight" in n}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with FlatLora(model, sigma=0.1, total_steps=3).perturb(2):
            conv_loss(model).backward()
    assert saved and not [t for t in saved if tuple(t.shape) in shapes and t.data_ptr() not in weights]


def test_conv_row_stds_follow_merge_and_the_buffer_is_exact():
    model = conv_toy()
    flat = FlatLora(model, sigma=0.3, schedule="constant", seed=6)
    buffered = FlatLora(model, sigma=0.3, schedule="constant", seed=6, noise_buffer=True)
    with flat.perturb(0):
        _, grads = grads_of(model, conv_loss)
    with buffered.perturb(0):
        _, grads_buffered = grads_of(model, conv_loss)
    assert all(torch.equal(grads[k], grads_buffered[k]) for k in grads)
    assert set(buffered.draw_counts().values()) == {1}
    target = flat._targets[0]
    before = flat._row_std(target, 0.3)
    target.layer.merge()
    assert torch.allclose(flat._row_std(target, 0.3), before, rtol=1e-4)
    target.layer.unmerge()
    assert torch.allclose(flat._row_std(target, 0.3), before, rtol=1e-4)
