"""--gradient_checkpointing recomputes the text encoders' layers in backward, not only the UNet's."""

from __future__ import annotations

import pytest
import torch

from flatlora_diffusion.sdxl.conditioning import encode_prompts
from flatlora_diffusion.sdxl.models import load_sdxl
from flatlora_diffusion.training.config import TrainConfig
from flatlora_diffusion.training.setup import attach_lora


def trained_models(model_dir, tmp_path, checkpointing: bool):
    config = TrainConfig(instance_data_dir=str(tmp_path), instance_prompt="a sks star", rank=4, lora_alpha=6,
                         train_text_encoder=True, gradient_checkpointing=checkpointing)
    parts = load_sdxl(str(model_dir))
    return parts, attach_lora(config, parts)


def layer_forward_calls(parts, trained) -> dict[str, int]:
    """Forward calls of q_proj in each encoder's first layer during one forward + backward (transformers
    checkpoints a layer's `forward`, so hooks on the layer itself stay outside the recompute, and the
    recompute stops early once the tensors backward needs are back: q_proj comes first)."""
    calls = {"text_encoder": 0, "text_encoder_2": 0}
    handles = []
    for name in calls:
        layer = getattr(trained[name], "text_model", trained[name]).encoder.layers[0].self_attn.q_proj
        handles.append(layer.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)))
    embeds = encode_prompts([trained["text_encoder"], trained["text_encoder_2"]], parts.tokenizers,
                            ["a sks star on a blue background"], "cpu")
    (embeds.hidden.square().mean() + embeds.pooled.square().mean()).backward()
    for handle in handles:
        handle.remove()
    return calls


@pytest.mark.parametrize("checkpointing, calls", [(False, 1), (True, 2)])
def test_text_encoder_layers_recompute_in_backward_with_checkpointing(default_model_dir, tmp_path,
                                                                       checkpointing, calls):
    parts, trained = trained_models(default_model_dir, tmp_path, checkpointing)
    assert layer_forward_calls(parts, trained) == {"text_encoder": calls, "text_encoder_2": calls}


def test_checkpointing_leaves_the_text_encoder_gradients_unchanged(default_model_dir, tmp_path):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        parts, trained = trained_models(default_model_dir, tmp_path, checkpointing)
        for model in trained.values():  # away from identity: B != 0
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(param, std=0.05)
        layer_forward_calls(parts, trained)
        grads.append({n: p.grad.clone() for n, p in trained["text_encoder_2"].named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
