"""The per-step noise buffer: one draw per layer per step, the same results as without it."""

from __future__ import annotations

import torch

from flatlora_diffusion import FlatLora
from flatlora_diffusion.lora.attach import lora_parameters
from tests.flat.test_flat_lora import toy
from tests.helpers import add_test_loras, unet_inputs, unet_loss


def _accumulated_grads(model, flat, step, losses):
    for p in lora_parameters(model):
        p.grad = None
    with flat.perturb(step):
        for loss_fn in losses:
            loss_fn(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _draws_in_step(flat, model, step, losses):
    before = flat.draw_counts()
    grads = _accumulated_grads(model, flat, step, losses)
    return grads, {name: n - before[name] for name, n in flat.draw_counts().items()}


def _toy_micro_batches(count):
    batches = [torch.randn(3, 32, generator=torch.Generator().manual_seed(i)) for i in range(count)]
    return [lambda m, x=x: m(x).square().mean() for x in batches]


def test_buffer_draws_once_per_step_and_gives_the_same_gradients():
    losses = _toy_micro_batches(4)
    model = toy()
    plain = FlatLora(model, sigma=0.3, schedule="constant", seed=2)
    buffered = FlatLora(model, sigma=0.3, schedule="constant", seed=2, noise_buffer=True)
    for step in range(2):
        grads, draws = _draws_in_step(plain, model, step, losses)
        grads_buffered, draws_buffered = _draws_in_step(buffered, model, step, losses)
        assert grads.keys() == grads_buffered.keys()
        assert all(torch.equal(grads[k], grads_buffered[k]) for k in grads)
        # fc1's input needs no gradient: its backward draws nothing; fc2 draws in forward and backward
        assert draws == {"fc1": 4, "fc2": 8}
        assert draws_buffered == {"fc1": 1, "fc2": 1}
        assert all(t.slot._kept is None for t in buffered._targets)  # freed at the end of perturb


def test_buffer_memory_cost_is_one_weight_copy_per_perturbed_layer():
    model = toy(torch.bfloat16)
    flat = FlatLora(model, sigma=0.1, schedule="constant", noise_buffer=True)
    assert flat.noise_buffer_bytes() == 2 * (32 * 48 + 48 * 8)


def test_buffer_with_gradient_checkpointing_and_accumulation_on_the_unet(tiny_pipe):
    unet = add_test_loras(tiny_pipe, text_encoders=False).unet
    unet.train()
    unet.enable_gradient_checkpointing()
    losses = [lambda m, i=i: unet_loss(m, unet_inputs(m, seed=i)) for i in range(2)]
    plain = FlatLora({"unet": unet}, sigma=0.2, schedule="constant", seed=1)
    buffered = FlatLora({"unet": unet}, sigma=0.2, schedule="constant", seed=1, noise_buffer=True)
    grads, draws = _draws_in_step(plain, unet, 0, losses)
    grads_buffered, draws_buffered = _draws_in_step(buffered, unet, 0, losses)
    assert all(torch.equal(grads[k], grads_buffered[k]) for k in grads)
    assert max(draws.values()) == 2 * 3  # forward, recomputed forward, backward per micro-batch
    assert set(draws_buffered.values()) == {1}
