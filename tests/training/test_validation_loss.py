"""The deterministic validation loss: fixed inputs, eval mode, no RNG drawn, logged at its steps, resume exact."""

from __future__ import annotations

import contextlib
import shutil
from types import SimpleNamespace

import pytest
import torch

from flatlora_diffusion.data.examples import load_examples
from flatlora_diffusion.lora.attach import LoraOptions, add_unet_lora, lora_parameters
from flatlora_diffusion.lora.load import load_lora_file
from flatlora_diffusion.sdxl.models import load_sdxl
from flatlora_diffusion.training.cli import run_training
from flatlora_diffusion.training.config import TrainConfig
from flatlora_diffusion.training.metrics import read_metrics
from flatlora_diffusion.training.validation_loss import ValidationLoss, fixed_timesteps
from tests.training.test_training_script import _lora, args, assert_same_tensors, instance_dir, straight_and_resumed  # noqa: F401

CPU = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext, is_main_process=True)


@pytest.fixture(scope="module")
def evaluation(default_model_dir, instance_dir):  # noqa: F811
    """A ValidationLoss over the instance images, on a UNet with random-B LoRA and dropout 0.5."""
    parts = load_sdxl(str(default_model_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        add_unet_lora(parts.unet, LoraOptions(rank=4, alpha=6.0, init="none", dropout=0.5, conv_rank=2,
                                              conv_alpha=3.0))
    config = TrainConfig(instance_data_dir=str(instance_dir), instance_prompt="a photo of sks cat", resolution=64,
                         validation_loss_every=2)
    examples = load_examples(instance_dir, config.instance_prompt)
    return ValidationLoss(examples, config, parts, {"unet": parts.unet}, CPU), parts


def test_timesteps_are_the_midpoints_of_four_slices():
    assert fixed_timesteps(1000).tolist() == [125, 375, 625, 875]


def test_two_evaluations_give_the_same_value_and_draw_no_global_rng(evaluation):
    loss, parts = evaluation
    parts.unet.train()  # dropout 0.5 would change every evaluation outside eval mode
    rng = torch.get_rng_state()
    first, second = loss(), loss()
    assert first == second and first > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert parts.unet.training and all(m.training for m in parts.unet.modules())  # restored after


def test_the_value_follows_the_lora_weights(evaluation):
    loss, parts = evaluation
    before = loss()
    params = lora_parameters(parts.unet)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.mul_(1.5)
    try:
        assert loss() != before
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
    assert loss() == before


def test_logged_every_n_steps_and_at_the_end_on_held_out_images(default_model_dir, instance_dir, tmp_path):  # noqa: F811
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    shutil.copy(next(instance_dir.glob("*.png")), held_out / "one.png")
    out = tmp_path / "run"
    assert run_training(args(default_model_dir, instance_dir, out, "--max_train_steps", "5",
                             "--validation_loss_every", "2", "--validation_data_dir", held_out)) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4, 5]
    assert all(r["val_loss"] > 0 for r in rows if "val_loss" in r)
    # The last value is the exported LoRA's: recomputed on fresh models loaded from the file.
    parts = load_sdxl(str(default_model_dir))
    load_lora_file(out / "pytorch_lora_weights.safetensors", parts.unet)
    config = TrainConfig(instance_data_dir=str(instance_dir), instance_prompt="a photo of sks cat", resolution=64,
                         validation_loss_every=2)
    fresh = ValidationLoss(load_examples(held_out, config.instance_prompt), config, parts, {"unet": parts.unet}, CPU)
    assert fresh() == pytest.approx(rows[-1]["val_loss"], rel=1e-6)


def test_resume_stays_exact_and_training_is_unchanged_with_the_validation_loss_on(default_model_dir, instance_dir,  # noqa: F811
                                                                                   tmp_path):
    knobs = ("--lora_dropout", "0.1", "--random_flip", "--train_text_encoder", "--max_train_steps", "4")
    straight, resumed = straight_and_resumed(default_model_dir, instance_dir, tmp_path, "--validation_loss_every", "1",
                                             *knobs)
    assert_same_tensors(_lora(straight), _lora(resumed))
    # The evaluations draw from no training stream (the dropout RNG included): the LoRA is the one trained without.
    assert run_training(args(default_model_dir, instance_dir, tmp_path / "without", *knobs)) == 0
    assert_same_tensors(_lora(straight), _lora(tmp_path / "without"))
    values = {r["step"]: r["val_loss"] for r in read_metrics(straight / "metrics.jsonl")}
    again = {r["step"]: r["val_loss"] for r in read_metrics(resumed / "metrics.jsonl")}
    assert sorted(values) == [1, 2, 3, 4] and len(set(values.values())) == 4  # the LoRA moves, so does the loss
    assert again == {3: values[3], 4: values[4]}


def test_validation_loss_flags_are_checked(tmp_path, default_model_dir, instance_dir, capsys):  # noqa: F811
    with pytest.raises(ValueError, match="--validation_data_dir is set but --validation_loss_every is not"):
        TrainConfig(instance_data_dir="x", instance_prompt="p", validation_data_dir="y")
    with pytest.raises(ValueError, match="--validation_loss_every must be >= 1"):
        TrainConfig(instance_data_dir="x", instance_prompt="p", validation_loss_every=0)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    assert run_training(args(default_model_dir, instance_dir, out, "--validation_loss_every", "1",
                             "--validation_data_dir", tmp_path / "empty")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: validation folder is empty"), err
    assert not out.exists()
