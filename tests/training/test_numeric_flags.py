"""Issue 14: flag values the maths cannot hold are refused at start, naming the flag."""

from __future__ import annotations

import pytest

from flatlora_diffusion.errors import UserError
from flatlora_diffusion.training.cli import run_training
from flatlora_diffusion.training.config import TrainConfig, parse_config

BASE = dict(instance_data_dir="photos", instance_prompt="a sks cat")


@pytest.mark.parametrize("flag, value, message", [
    ("learning_rate", 1e39, "beyond float32"),
    ("learning_rate", float("nan"), "finite"),
    ("learning_rate", float("inf"), "finite"),
    ("adam_epsilon", float("inf"), "finite"),
    ("max_grad_norm", float("nan"), "finite"),   # NaN passes every `< 0` check
    ("flat_sigma", float("nan"), "finite"),
    ("noise_offset", 1e300, "beyond float32"),
    ("text_encoder_lr", -1e40, "beyond float32"),
    ("seed", -1, "between 0 and"),
    ("seed", 2**32, "between 0 and"),
    ("flat_seed", 2**40, "between 0 and"),
    ("max_train_steps", 10**20, "64-bit"),
    ("max_nonfinite_steps", 0, ">= 1"),
])
def test_a_value_the_maths_cannot_hold_names_the_flag(flag, value, message):
    extra = {"train_text_encoder": True} if flag == "text_encoder_lr" else {}
    with pytest.raises(UserError, match=message) as caught:
        TrainConfig(**BASE, **extra, **{flag: value})
    assert f"--{flag}" in str(caught.value)


def test_the_largest_float32_learning_rate_is_still_accepted():
    assert TrainConfig(**BASE, learning_rate=3.4e38).learning_rate == 3.4e38


def test_toml_nan_and_inf_are_refused_too(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('instance_data_dir = "x"\ninstance_prompt = "a sks"\nprior_loss_weight = inf\n')
    with pytest.raises(UserError, match="--prior_loss_weight must be a finite number"):
        parse_config(["--config", str(toml)])


@pytest.mark.parametrize("argv", [["--learning_rate", "1e39"], ["--learning_rate", "nan"], ["--adam_beta2", "inf"]])
def test_command_line_gets_one_error_line_and_exit_2(argv, tmp_path, capsys):
    code = run_training(["--instance_data_dir", str(tmp_path), "--instance_prompt", "a sks",
                         "--output_dir", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {argv[0]}"), err
    assert not (tmp_path / "out").exists()
