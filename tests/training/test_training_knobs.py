"""Issue 5's loss, optimizer and EMA options, against hand-computed values."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open
from safetensors.torch import load_file

from flatlora_diffusion.training.cli import run_training
from flatlora_diffusion.training.ema import Ema
from flatlora_diffusion.training.losses import min_snr_weights, noisy_inputs, prediction_target
from tests.training.test_training_script import args, assert_same_tensors, instance_dir, straight_and_resumed  # noqa: F401


def scheduler(prediction_type="epsilon"):
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type=prediction_type)


def hand_alpha_bar(t: int) -> float:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return float(torch.cumprod(1 - betas, 0)[t])


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_the_formula(kind):
    t = torch.tensor([0, 10, 300, 999])
    got = min_snr_weights(scheduler(kind), t, gamma=5.0)
    for i, step in enumerate(t.tolist()):
        ab = hand_alpha_bar(step)
        snr = ab / (1 - ab)
        want = min(snr, 5.0) / (snr + 1 if kind == "v_prediction" else snr)
        assert got[i].item() == pytest.approx(want, rel=1e-4)
    assert got[0] < 1 and got[-1] == pytest.approx(1.0 if kind == "epsilon" else got[-1].item())


def test_v_prediction_target_is_alpha_eps_minus_sigma_x0():
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([50, 700])
    v = prediction_target(scheduler("v_prediction"), x0, eps, t)
    for i in range(2):
        ab = hand_alpha_bar(t[i].item())
        want = ab ** 0.5 * eps[i] - (1 - ab) ** 0.5 * x0[i]
        assert torch.allclose(v[i], want.float(), atol=1e-5)
    assert torch.equal(prediction_target(scheduler("epsilon"), x0, eps, t), eps)


def test_noise_offset_adds_one_constant_per_sample_and_channel():
    latents = torch.zeros(3, 4, 8, 8)
    plain, _, _ = noisy_inputs(scheduler(), latents, torch.Generator().manual_seed(0))
    offset, _, _ = noisy_inputs(scheduler(), latents, torch.Generator().manual_seed(0), noise_offset=0.1)
    shift = offset - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)
    assert 0.01 < shift[:, :, 0, 0].abs().mean() < 0.3


def test_ema_update_equals_the_formula():
    layer = torch.nn.Linear(3, 2)
    ema = Ema({"m": layer}, decay=0.9)
    start = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update()  # warm-up decay min(0.9, 2/11)
    d = min(0.9, 2 / 11)
    assert torch.allclose(ema.shadow["m/weight"], d * start + (1 - d) * (start + 1))
    restored = Ema({"m": layer}, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1 and torch.equal(restored.shadow["m/weight"], ema.shadow["m/weight"])


def test_ema_run_exports_ema_as_main_and_survives_resume(default_model_dir, instance_dir, tmp_path):  # noqa: F811
    straight, resumed = straight_and_resumed(default_model_dir, instance_dir, tmp_path, "--ema_decay", "0.8",
                                             "--snr_gamma", "5", "--noise_offset", "0.05", "--random_flip")
    for name in ("pytorch_lora_weights.safetensors", "raw_weights/pytorch_lora_weights.safetensors"):
        assert_same_tensors(load_file(straight / name), load_file(resumed / name))
    main, raw = load_file(straight / "pytorch_lora_weights.safetensors"), \
        load_file(straight / "raw_weights/pytorch_lora_weights.safetensors")
    assert any(not torch.equal(main[k], raw[k]) for k in main)
    with safe_open(straight / "pytorch_lora_weights_kohya.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["ss_ema_decay"] == "0.8" and meta["ss_min_snr_gamma"] == "5.0" and meta["ss_noise_offset"] == "0.05"
    card = (straight / "README.md").read_text()
    assert "0.8" in card and "5.0" in card


def test_v_prediction_model_is_trained_on_v_without_a_flag(default_model_dir, instance_dir, tmp_path):  # noqa: F811
    model = tmp_path / "vpred"
    shutil.copytree(default_model_dir, model)
    config_file = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    out = tmp_path / "run"
    assert run_training(args(model, instance_dir, out)) == 0
    with safe_open(out / "pytorch_lora_weights_kohya.safetensors", "pt") as f:
        assert f.metadata()["ss_prediction_type"] == "v_prediction"


@pytest.mark.parametrize("flags, package", [(("--use_8bit_adam",), "bitsandbytes"),
                                            (("--optimizer", "prodigy"), "prodigyopt")])
def test_missing_optional_package_is_a_clear_error(flags, package, default_model_dir, instance_dir, tmp_path,  # noqa: F811
                                                   capsys):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here; the missing-package path cannot be exercised")
    assert run_training(args(default_model_dir, instance_dir, tmp_path / "o", *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and package in err[0] and "pip install" in err[0]


def test_missing_tracker_is_a_clear_error(default_model_dir, instance_dir, tmp_path, capsys):  # noqa: F811
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed here; the missing-package path cannot be exercised")
    assert run_training(args(default_model_dir, instance_dir, tmp_path / "o", "--report_to", "tensorboard")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install tensorboard" in err[0] and not (tmp_path / "o").exists()
