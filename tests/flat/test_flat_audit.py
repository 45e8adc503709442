"""Issue 13's audit findings on FlatLora: row norms after PEFT merge/unmerge, frozen LoRA layers."""

from __future__ import annotations

import copy
import math

import torch
from peft import LoraConfig, inject_adapter_in_model

from flatlora_diffusion import FlatLora
from flatlora_diffusion.flat.flat_lora import find_lora_layers, layer_seed
from flatlora_diffusion.flat.noisy_ops import layer_noise
from flatlora_diffusion.lora.attach import freeze_lora_after_hidden_state
from tests.helpers import add_test_loras, text_inputs

SIGMA = 0.2


def _merged_toy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    config = LoraConfig(r=4, lora_alpha=12, init_lora_weights=False, target_modules=["0", "2"])
    model = inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    for _name, layer in find_lora_layers(model):
        with torch.no_grad():
            layer.lora_B["default"].weight.mul_(20.0)  # a delta that clearly moves the row norms
    return model


def _expected_row_std(layer) -> torch.Tensor:
    """sigma·||W'_i||/sqrt(n) from scratch: a merged layer's W already is W'."""
    weight = layer.get_base_layer().weight.detach().float()
    if not layer.merged:
        weight = weight + layer.get_delta_weight("default").float()
    return SIGMA * weight.norm(dim=1) / math.sqrt(weight.shape[1])


def _row_stds(flat: FlatLora) -> dict[str, torch.Tensor]:
    return {t.name: flat._row_std(t, SIGMA).float() for t in flat._targets}


def test_row_stds_follow_a_peft_merge_and_unmerge():
    model = _merged_toy()
    layers = dict(find_lora_layers(model))
    flat = FlatLora(model, sigma=SIGMA, schedule="constant", seed=1)
    with flat.perturb(0):
        model(torch.randn(2, 64))  # the stds of step 0 are computed (and anything cached is filled)
    before = _row_stds(flat)
    for stage in ("merge", "unmerge"):
        for layer in layers.values():
            getattr(layer, stage)()
        stds = _row_stds(flat)
        for name, layer in layers.items():
            assert torch.allclose(stds[name], _expected_row_std(layer), rtol=1e-4), (stage, name)
            assert torch.allclose(stds[name], before[name], rtol=1e-4), (stage, name)  # W' is the same W'


def _te1_with_frozen_tail(tiny_pipe):
    pipe = add_test_loras(tiny_pipe)
    frozen = freeze_lora_after_hidden_state(pipe.text_encoder, -2)
    assert frozen
    frozen_layers = {path.split(".lora_")[0] for path in frozen}
    return pipe.text_encoder, frozen_layers


def _explicit_reference(model, flat, step):
    """A copy with W + eps materialised on exactly the layers `flat` perturbs."""
    ref = copy.deepcopy(model)
    sigma_t = flat.sigma_at(step)
    perturbed = set(flat.layer_names)
    for target, (name, layer) in zip(flat._targets, find_lora_layers({"text_encoder": ref})):
        if name in perturbed:
            std = flat._row_std(target, sigma_t)
            weight = layer.get_base_layer().weight
            weight.data += layer_noise(weight, std, layer_seed(flat.seed, step, flat.rank, name)).to(weight.dtype)
    return ref


def test_frozen_lora_layers_are_not_perturbed_and_what_sdxl_reads_is_exact(tiny_pipe):
    te1, frozen_layers = _te1_with_frozen_tail(tiny_pipe)
    flat = FlatLora({"text_encoder": te1}, sigma=SIGMA, schedule="constant", seed=5)
    perturbed = set(flat.layer_names)
    assert perturbed and not any(name.removeprefix("text_encoder.") in frozen_layers for name in perturbed)
    ids = text_inputs(vocab=te1.config.vocab_size)
    plain = te1(ids, output_hidden_states=True)
    with torch.no_grad(), flat.perturb(3):
        for name, layer in find_lora_layers({"text_encoder": te1}):
            assert ("forward" in vars(layer.get_base_layer())) == (name in perturbed), name
        out = te1(ids, output_hidden_states=True)
    reference = _explicit_reference(te1, flat, 3)(ids, output_hidden_states=True)
    assert not torch.allclose(out.hidden_states[-2], plain.hidden_states[-2])
    assert torch.allclose(out.hidden_states[-2], reference.hidden_states[-2], rtol=1e-5, atol=1e-6)
    # the frozen last layer computes with its own weights: the full output is that of the reference too
    assert torch.allclose(out.last_hidden_state, reference.last_hidden_state, rtol=1e-5, atol=1e-6)


def test_without_any_trainable_lora_every_layer_is_perturbed(tiny_pipe):
    """Evaluation (sharpness) perturbs a loaded, frozen LoRA: there every layer counts."""
    te1, _ = _te1_with_frozen_tail(tiny_pipe)
    te1.requires_grad_(False)
    flat = FlatLora({"text_encoder": te1}, sigma=SIGMA, schedule="constant")
    assert len(flat.layer_names) == len(find_lora_layers(te1))
