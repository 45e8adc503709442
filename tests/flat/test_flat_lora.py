"""Flat-LoRA's contract (issue 2): exact, seeded, non-destructive perturbation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from transformers.pytorch_utils import Conv1D

from flatlora_diffusion import FlatLora, FlatLoraError, sigma_at
from flatlora_diffusion.flat.flat_lora import find_lora_layers, layer_seed
from flatlora_diffusion.flat.noisy_ops import layer_noise
from flatlora_diffusion.lora.attach import lora_parameters
from tests.helpers import add_test_loras, text_inputs, text_loss, unet_inputs, unet_loss

TOY_LORA = LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, target_modules=["fc1", "fc2"])


class Toy(torch.nn.Module):
    def __init__(self, width_in=32, hidden=48, order=("fc1", "fc2")):
        super().__init__()
        layers = {"fc1": torch.nn.Linear(width_in, hidden), "fc2": torch.nn.Linear(hidden, 8)}
        for name in order:  # registration order is a parameter: names, not order, must matter
            setattr(self, name, layers[name])

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def toy(dtype=torch.float32, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = inject_adapter_in_model(TOY_LORA, Toy(**kwargs))
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" not in name:
            param.data = param.data.to(dtype)
    return model


def grads_of(model, loss_fn):
    for p in lora_parameters(model):
        p.grad = None
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- schedule and seeds

def test_cosine_schedule_formula_and_last_step_reaches_sigma():
    T = 10
    for step in range(T):
        expected = 0.1 * 0.5 * (1 - math.cos(math.pi * (step + 1) / T))
        assert sigma_at(step, 0.1, T, "cosine") == pytest.approx(expected, abs=1e-15)
    assert sigma_at(T - 1, 0.1, T) == pytest.approx(0.1, abs=1e-15)
    assert sigma_at(0, 0.1, T) < sigma_at(5, 0.1, T) < sigma_at(9, 0.1, T)
    assert sigma_at(3, 0.07, T, "constant") == 0.07


def test_layer_seed_depends_on_every_part_and_nothing_else():
    base = layer_seed(0, 5, 0, "unet.a")
    assert base == layer_seed(0, 5, 0, "unet.a")
    others = {layer_seed(1, 5, 0, "unet.a"), layer_seed(0, 6, 0, "unet.a"),
              layer_seed(0, 5, 1, "unet.a"), layer_seed(0, 5, 0, "unet.b")}
    assert base not in others and len(others) == 4


# ---------------------------------------------------------------- behaviour on a toy model

def toy_loss(model):
    g = torch.Generator().manual_seed(1)
    return model(torch.randn(6, 32, generator=g)).square().mean()


def test_outputs_and_grads_exact_outside_perturb_and_with_sigma_zero():
    plain, model = toy(), toy()
    loss0, grads0 = grads_of(plain, toy_loss)
    flat = FlatLora(model, sigma=0.1, total_steps=4, seed=0)
    with flat.perturb(2):
        loss_in, _ = grads_of(model, toy_loss)
    loss1, grads1 = grads_of(model, toy_loss)  # outside
    assert not torch.equal(loss_in, loss0)
    zero = FlatLora(model, sigma=0.0, total_steps=4)
    with zero.perturb(2):
        loss2, grads2 = grads_of(model, toy_loss)
    for loss, grads in ((loss1, grads1), (loss2, grads2)):
        assert torch.equal(loss, loss0)
        assert grads.keys() == grads0.keys() and all(torch.equal(grads[k], grads0[k]) for k in grads0)


def test_same_step_gives_bit_identical_noise_and_other_steps_differ():
    model = toy()
    flat = FlatLora(model, sigma=0.2, schedule="constant", seed=4)
    x = torch.randn(3, 32)
    with flat.perturb(1):
        a = model(x)
    with flat.perturb(1):
        b = model(x)
    with flat.perturb(2):
        c = model(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_layers_are_identified_by_name_not_registration_order():
    forward, backward = toy(order=("fc1", "fc2")), toy(order=("fc2", "fc1"))
    backward.load_state_dict(forward.state_dict())
    x = torch.randn(3, 32)
    outs = []
    for model in (forward, backward):
        with FlatLora(model, sigma=0.2, schedule="constant", seed=9).perturb(3):
            outs.append(model(x))
    assert torch.equal(outs[0], outs[1])


def _explicit_reference_grads(model, flat, step, loss_fn, label=""):
    """Materialise W + eps in a copy (fp32) with the same seeds and stds, then plain LoRA grads."""
    ref = copy.deepcopy(model)
    sigma_t = flat.sigma_at(step)
    for target, (name, layer) in zip(flat._targets, find_lora_layers({label: ref} if label else ref)):
        assert target.name == name
        std = flat._row_std(target, sigma_t)
        eps = layer_noise(layer.get_base_layer().weight, std, layer_seed(flat.seed, step, flat.rank, name))
        layer.get_base_layer().weight.data += eps
    return grads_of(ref, loss_fn)


def test_gradients_match_an_explicit_w_plus_eps_reference():
    model = toy()
    flat = FlatLora(model, sigma=0.3, total_steps=5, seed=2)
    with flat.perturb(3):
        loss, grads = grads_of(model, toy_loss)
    ref_loss, ref_grads = _explicit_reference_grads(model, flat, 3, toy_loss)
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for key in ref_grads:
        assert torch.allclose(grads[key], ref_grads[key], rtol=1e-4, atol=1e-6), key


def test_row_std_statistics_follow_the_merged_weight():
    """eps_ij ~ N(0, sigma^2 ||W'_i||^2 / n), checked on rows of 2048 elements."""
    model = toy(width_in=2048, hidden=64)
    layer = dict(find_lora_layers(model))["fc1"]
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(50.0)  # make W' clearly differ from W
    base = layer.get_base_layer()
    w = base.weight
    merged = w + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    expected = 0.5 * merged.norm(dim=1) / math.sqrt(2048)
    assert not torch.allclose(expected, 0.5 * w.norm(dim=1) / math.sqrt(2048), rtol=0.05)
    with torch.no_grad(), FlatLora(model, sigma=0.5, schedule="constant").perturb(0):
        eye = torch.eye(2048)
        perturbed = base(eye).t() - base.bias[:, None]
    eps = perturbed - w
    assert eps.mean(1).abs().max() < 4 * expected.max() / math.sqrt(2048)
    ratio = eps.std(1) / expected
    assert (ratio - 1).abs().max() < 0.1, ratio


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_base_weights_bit_identical_after_many_steps(dtype):
    model = toy(dtype)
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    flat = FlatLora(model, sigma=0.15, total_steps=30, seed=0)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    for step in range(30):
        with flat.perturb(step):
            x = torch.randn(4, 32, dtype=dtype)
            model(x).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert p.dtype == dtype and torch.equal(p, before[n]), n
        else:
            assert p.dtype == torch.float32


def test_global_rng_state_untouched():
    model = toy()
    state = torch.get_rng_state()
    with FlatLora(model, sigma=0.1, total_steps=3).perturb(2):
        grads_of(model, lambda m: m(torch.ones(2, 32)).sum())
    assert torch.equal(state, torch.get_rng_state())


def test_no_weight_sized_tensor_kept_between_forward_and_backward():
    model = toy(width_in=256, hidden=128)
    weights = {p.data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(p.shape) for n, p in model.named_parameters() if "base_layer.weight" in n}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with FlatLora(model, sigma=0.1, total_steps=3).perturb(2):
            model(torch.randn(5, 256)).sum().backward()
    new_weight_sized = [t for t in saved if tuple(t.shape) in weight_shapes and t.data_ptr() not in weights]
    assert saved and not new_weight_sized


def test_unsupported_layers_raise_clearly():
    for conv in (torch.nn.Conv1d(3, 4, 3), torch.nn.Conv3d(3, 4, 3)):
        conv = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), torch.nn.Sequential(conv))
        with pytest.raises(FlatLoraError, match="nn.Linear and nn.Conv2d only"):
            FlatLora(conv, total_steps=3)
    grouped = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2))
    grouped = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), grouped)
    with pytest.raises(FlatLoraError, match="groups=1"):
        FlatLora(grouped, total_steps=3)
    gpt2_style = torch.nn.Sequential(Conv1D(8, 4))  # weight stored (in, out): the reference gets n wrong
    fifo = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"], fan_in_fan_out=True), gpt2_style)
    with pytest.raises(FlatLoraError, match="fan_in_fan_out"):
        FlatLora(fifo, total_steps=3)
    dora = inject_adapter_in_model(LoraConfig(r=2, target_modules=["fc1"], use_dora=True), Toy())
    with pytest.raises(FlatLoraError, match="DoRA"):
        FlatLora(dora, total_steps=3)
    with pytest.raises(FlatLoraError, match="no PEFT LoRA layers"):
        FlatLora(Toy(), total_steps=3)
    with pytest.raises(FlatLoraError, match="total_steps"):
        FlatLora(toy(), schedule="cosine")


# ---------------------------------------------------------------- the tiny SDXL models

@pytest.fixture
def sdxl_with_lora(tiny_pipe):
    return add_test_loras(tiny_pipe)


def _sdxl_cases(pipe):
    unet_in = unet_inputs(pipe.unet)
    ids = text_inputs(vocab=pipe.text_encoder.config.vocab_size)
    return {
        "unet": (pipe.unet, lambda m: unet_loss(m, unet_in)),
        "text_encoder": (pipe.text_encoder, lambda m: text_loss(m, ids)),
        "text_encoder_2": (pipe.text_encoder_2, lambda m: text_loss(m, ids)),
    }


@pytest.mark.parametrize("which", ["unet", "text_encoder", "text_encoder_2"])
def test_sdxl_grads_match_reference_and_plain_lora_outside(sdxl_with_lora, which):
    model, loss_fn = _sdxl_cases(sdxl_with_lora)[which]
    loss0, grads0 = grads_of(model, loss_fn)
    flat = FlatLora({which: model}, sigma=0.1, total_steps=4, seed=1)
    with flat.perturb(2):
        loss, grads = grads_of(model, loss_fn)
    ref_loss, ref_grads = _explicit_reference_grads(model, flat, 2, loss_fn, label=which)
    assert not torch.allclose(loss, loss0)
    assert torch.allclose(loss, ref_loss, rtol=1e-4, atol=1e-6)
    for key in ref_grads:
        assert torch.allclose(grads[key], ref_grads[key], rtol=1e-3, atol=1e-6), key
    loss1, grads1 = grads_of(model, loss_fn)
    assert torch.equal(loss1, loss0) and all(torch.equal(grads1[k], grads0[k]) for k in grads0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdxl_base_untouched_in_half_precision(sdxl_with_lora, dtype):
    pipe = sdxl_with_lora
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    for model in models.values():
        for name, param in model.named_parameters():
            if "lora_" not in name:
                param.data = param.data.to(dtype)
    before = {f"{k}.{n}": p.clone() for k, m in models.items() for n, p in m.named_parameters() if "lora_" not in n}
    flat = FlatLora(models, sigma=0.1, total_steps=3)
    ids = text_inputs(vocab=pipe.text_encoder.config.vocab_size)
    state = torch.get_rng_state()
    for step in range(3):
        with flat.perturb(step), torch.autocast("cpu", dtype=dtype):
            for model in (pipe.text_encoder, pipe.text_encoder_2):
                text_loss(model, ids).float().backward()
            unet_loss(pipe.unet, unet_inputs(pipe.unet)).float().backward()
    assert torch.equal(state, torch.get_rng_state())
    after = {f"{k}.{n}": p for k, m in models.items() for n, p in m.named_parameters() if "lora_" not in n}
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora_parameters(pipe.unet))


def test_sdxl_gradient_checkpointing_sees_the_same_noise(sdxl_with_lora):
    unet = sdxl_with_lora.unet
    unet.train()
    inputs = unet_inputs(unet)
    flat = FlatLora({"unet": unet}, sigma=0.1, total_steps=4, seed=3)
    with flat.perturb(3):
        _, plain = grads_of(unet, lambda m: unet_loss(m, inputs))
    unet.enable_gradient_checkpointing()
    with flat.perturb(3):
        _, checkpointed = grads_of(unet, lambda m: unet_loss(m, inputs))
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        assert torch.allclose(plain[key], checkpointed[key], rtol=1e-5, atol=1e-7), key


def test_sdxl_layer_counts(sdxl_with_lora):
    pipe = sdxl_with_lora
    flat = FlatLora({"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2},
                    total_steps=2)
    names = flat.layer_names
    n_te = 4 * pipe.text_encoder.config.num_hidden_layers
    assert sum(n.startswith("text_encoder.") for n in names) == n_te
    assert sum(n.startswith("text_encoder_2.") for n in names) == n_te
    assert all(n.split(".")[-1] in {"to_q", "to_k", "to_v", "0"} for n in names if n.startswith("unet."))
