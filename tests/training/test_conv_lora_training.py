"""Training with --conv_rank (kohya LoCon layout): both files carry the conv modules, resume stays exact."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from flatlora_diffusion.errors import UserError
from flatlora_diffusion.lora.load import load_lora_into_pipeline
from flatlora_diffusion.training.cli import run_training
from flatlora_diffusion.training.config import TrainConfig
from tests.training.test_training_script import args, assert_same_tensors, instance_dir, straight_and_resumed  # noqa: F401

CONV = ("--conv_rank", "2", "--conv_alpha", "3")  # linear: --rank 4 --lora_alpha 6 (see args)
FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors")


def conv_up_weights(out) -> dict[str, torch.Tensor]:
    tensors = load_file(out / FILES[1])
    # 11 resnets (in_layers_2 = conv1) and 2 downsamplers (op) in the tiny UNet
    return {k: t for k, t in tensors.items() if k.endswith(("in_layers_2.lora_up.weight", "_op.lora_up.weight"))}


def assert_loads_without_warnings(model_dir, out) -> None:
    for kind, name in zip(("diffusers", "kohya"), FILES):
        pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pipe.load_lora_weights(out, weight_name=name)
        ours = load_lora_into_pipeline(StableDiffusionXLPipeline.from_pretrained(model_dir), out / name)
        assert sum(m.spatial for _, _, m in ours.items()) == 26, kind  # the tiny UNet's 3x3 convs


def test_conv_lora_run_exports_conv_modules_and_resumes_exactly(default_model_dir, instance_dir, tmp_path):  # noqa: F811
    straight, resumed = straight_and_resumed(default_model_dir, instance_dir, tmp_path, *CONV, "--flat_sigma", "0.1",
                                             "--lora_dropout", "0.1", "--random_flip", "--train_text_encoder")
    for name in FILES:
        assert_same_tensors(load_file(straight / name), load_file(resumed / name))
    ups = conv_up_weights(straight)
    assert len(ups) == 13 and all(t.abs().sum() > 0 for t in ups.values())  # gaussian init: B started at zero
    kohya = load_file(straight / FILES[1])
    assert kohya["lora_unet_input_blocks_2_0_op.lora_down.weight"].shape == (2, 48, 3, 3)
    assert kohya["lora_unet_input_blocks_2_0_op.alpha"].item() == 3.0
    assert kohya["lora_unet_output_blocks_0_0_skip_connection.alpha"].item() == 6.0
    config = json.loads((straight / "config.json").read_text())
    assert (config["conv_rank"], config["conv_alpha"]) == (2, 3.0)
    assert "| conv LoRA rank / alpha (kohya LoCon layout) | 2 / 3.0 |" in (straight / "README.md").read_text()
    assert_loads_without_warnings(default_model_dir, straight)


def test_conv_lora_trains_under_flat_lora(default_model_dir, instance_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert run_training(args(default_model_dir, instance_dir, out, *CONV, "--flat_sigma", "0.1")) == 0
    ups = conv_up_weights(out)
    assert len(ups) == 13 and all(t.abs().sum() > 0 for t in ups.values())
    assert_loads_without_warnings(default_model_dir, out)


@pytest.mark.parametrize("flags, message", [
    ({"conv_alpha": 2.0}, "--conv_alpha is set but --conv_rank is not"),
    ({"conv_rank": 0}, "--conv_rank must be >= 1"),
    ({"conv_rank": 2, "conv_alpha": 0.0}, "--conv_alpha must be > 0"),
])
def test_bad_conv_flags_name_the_flag(flags, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(instance_data_dir="x", instance_prompt="p", **flags)
