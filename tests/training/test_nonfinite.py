"""Issue 14: a NaN/inf loss or gradient skips the step (no optimizer, LR or EMA update), N in a row stop."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import flatlora_diffusion.training.loop as training
from flatlora_diffusion.training.checkpoint import missing_parts
from flatlora_diffusion.training.cli import run_training
from flatlora_diffusion.training.metrics import read_metrics
from tests.training.test_training_script import args


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two small real photos (scikit-image's bundled CC0 images)."""
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    for name in ("chelsea", "coffee"):
        Image.fromarray(getattr(data, name)()).resize((96, 72)).save(folder / f"{name}.png")
    return folder


def poison(monkeypatch, bad_steps: set[int], where: str = "loss"):
    """At optimizer steps `bad_steps` (1-based, as metrics.jsonl counts) the loss is NaN (where="loss"),
    or finite with NaN gradients (where="grad")."""
    original_batch, original_loss, current = training.micro_batch, training.compute_loss, {}

    def batch_and_step(run, step, micro):
        current["step"] = step + 1
        return original_batch(run, step, micro)

    def poisoned(*a, **kw):
        loss = original_loss(*a, **kw)
        if current["step"] not in bad_steps:
            return loss
        if where == "loss":
            return loss * float("nan")
        loss.register_hook(lambda grad: grad * float("nan"))
        return loss

    monkeypatch.setattr(training, "micro_batch", batch_and_step)
    monkeypatch.setattr(training, "compute_loss", poisoned)


def checkpoint_tensors(out, step, name="lora_params"):
    return load_file(out / f"checkpoint-{step}" / f"{name}.safetensors")


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_a_nan_step_is_skipped_and_counted(where, default_model_dir, photos, tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison(monkeypatch, {2}, where)
    assert run_training(args(default_model_dir, photos, out, "--max_train_steps", "3", "--checkpointing_steps",
                             "1", "--lr_scheduler", "linear", "--ema_decay", "0.9")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["skipped"] for r in rows] == [False, True, False] and [r["skipped_steps"] for r in rows] == [0, 1, 1]
    assert rows[1]["lr"] == rows[0]["lr"] > rows[2]["lr"]  # the LR schedule did not advance on the skip
    assert same(checkpoint_tensors(out, 1), checkpoint_tensors(out, 2))  # no optimizer update
    assert same(checkpoint_tensors(out, 1, "ema"), checkpoint_tensors(out, 2, "ema"))  # no EMA update
    assert not same(checkpoint_tensors(out, 2), checkpoint_tensors(out, 3))  # training went on
    opt1 = torch.load(out / "checkpoint-1" / "optimizer.pt", weights_only=True)["state"]
    opt2 = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)["state"]
    assert all(torch.equal(opt1[k]["exp_avg"], opt2[k]["exp_avg"]) for k in opt1)
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(t).all() for t in lora.values())
    assert json.loads((out / "checkpoint-3" / "state.json").read_text())["nonfinite"]["total"] == 1


def test_n_skips_in_a_row_stop_with_one_line_and_keep_the_good_checkpoint(default_model_dir, photos, tmp_path,
                                                                         monkeypatch, capsys):
    out = tmp_path / "run"
    poison(monkeypatch, {2, 3, 4, 5, 6})
    code = run_training(args(default_model_dir, photos, out, "--max_train_steps", "6", "--checkpointing_steps",
                             "1", "--checkpoints_total_limit", "1", "--max_nonfinite_steps", "3"))
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and "Traceback" not in stderr, stderr
    assert err[0].startswith("error: training stopped at step 4: 3 steps in a row (since step 2)"), err[0]
    assert "checkpoint-3" in err[0]  # the newest kept: its weights are the last good ones (step 1's)
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"] and not missing_parts(out / "checkpoint-3")
    weights = checkpoint_tensors(out, 3)
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_skipped_steps_resume_exactly(default_model_dir, photos, tmp_path, monkeypatch):
    from tests.training.test_training_script import assert_same_tensors, straight_and_resumed

    poison(monkeypatch, {2, 3})  # one skip before the checkpoint at 2, one after it
    straight, resumed = straight_and_resumed(default_model_dir, photos, tmp_path)
    assert_same_tensors(load_file(straight / "pytorch_lora_weights.safetensors"),
                        load_file(resumed / "pytorch_lora_weights.safetensors"))
    assert [r["skipped_steps"] for r in read_metrics(resumed / "metrics.jsonl")] == [2, 2]  # 1 restored + 1


def test_the_grad_scalers_own_skip_is_reported_and_holds_the_lr(default_model_dir, photos, tmp_path, monkeypatch):
    # No fp16 GradScaler on a CPU: accelerate's report of a skipped scaler step is simulated at step 2.
    from accelerate import Accelerator

    out, steps = tmp_path / "run", []
    original = training.micro_batch
    monkeypatch.setattr(training, "micro_batch", lambda run, step, micro: steps.append(step + 1) or
                        original(run, step, micro))
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: steps[-1] == 2))
    assert run_training(args(default_model_dir, photos, out, "--max_train_steps", "3",
                             "--lr_scheduler", "linear")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["skipped"] for r in rows] == [False, True, False] and rows[1]["lr"] == rows[0]["lr"] > rows[2]["lr"]


def test_a_skip_under_fp16_still_lowers_the_loss_scale():
    from types import SimpleNamespace

    from flatlora_diffusion.training.nonfinite import skip_step

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    fake = SimpleNamespace(scaler=scaler, mixed_precision="fp16")
    for _ in range(2):  # a second step would raise "unscale_() has already been called" without the update
        scaler.scale((param * torch.tensor([1.0, float("inf"), 0.0])).sum()).backward()
        scaler.unscale_(optimizer)
        skip_step(fake)
    assert scaler.get_scale() == 256.0 and torch.equal(param.detach(), torch.ones(3))
    optimizer.zero_grad()
