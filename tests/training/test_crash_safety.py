"""Issue 14: a process SIGKILLed at any point of a checkpoint save or an export leaves the previous
checkpoint and files intact, and `--resume_from_checkpoint latest` takes the newest complete one."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flatlora_diffusion.training.loop as training
from flatlora_diffusion.training.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    missing_parts,
    resolve_checkpoint,
    save_checkpoint,
)
from flatlora_diffusion.training.cli import run_training
from tests.training.test_multiprocess import REPO
from tests.training.test_nonfinite import photos  # noqa: F401  (a fixture)
from tests.training.test_training_script import args

# Every call that changes the disk during a save: after the k-th one the process SIGKILLs itself.
DISK_CALLS = [(torch, "save"), (os, "replace"), (os, "unlink"), (os, "rmdir"), (Path, "write_text"),
              (Path, "write_bytes")]


@contextlib.contextmanager
def killed_after(k: int, modules=()):
    """Count disk-changing calls (also safetensors' save_file as imported by `modules`); SIGKILL after the k-th."""
    count = {"n": 0}
    targets = DISK_CALLS + [(m, "save_file") for m in modules]
    originals = {(owner, name): getattr(owner, name) for owner, name in targets}

    def counting(original):
        def call(*a, **kw):
            result = original(*a, **kw)
            count["n"] += 1
            if count["n"] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return call

    for (owner, name), original in originals.items():
        setattr(owner, name, counting(original))
    try:
        yield count
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


def in_child(work) -> int:
    """Run `work()` (file writes only, no threads needed) in a forked child; its exit status, or -signal."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            work()
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def tiny_state(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).square().sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return {"unet": model}, optimizer, scheduler


def test_sigkill_at_every_point_of_a_checkpoint_save_keeps_a_complete_one(tmp_path):
    from flatlora_diffusion.training import checkpoint as module

    saved = {step: tiny_state(step) for step in (1, 2, 3)}
    expected = {step: {k: v.clone() for k, v in s[0]["unet"].state_dict().items()} for step, s in saved.items()}
    with killed_after(0, [module]) as count:  # a dry run: how many disk calls one save with pruning makes
        save_checkpoint(tmp_path / "dry", 1, *saved[1])
        start = count["n"]
        save_checkpoint(tmp_path / "dry", 2, *saved[2], total_limit=1)
        calls = count["n"] - start
    assert calls >= 10
    for k in range(1, calls + 1):
        out = tmp_path / f"kill{k}"
        save_checkpoint(out, 1, *saved[1])

        def second_save(out=out, k=k):
            with killed_after(k, [module]):
                save_checkpoint(out, 2, *saved[2], total_limit=1)

        assert in_child(second_save) == -signal.SIGKILL, k
        folder = resolve_checkpoint(out, "latest", warn=lambda message: None)
        step = int(folder.name.split("-")[1])
        models, optimizer, scheduler = tiny_state(99)
        assert load_checkpoint(folder, models, optimizer, scheduler)["step"] == step
        assert all(torch.equal(models["unet"].state_dict()[n], v) for n, v in expected[step].items()), k
        save_checkpoint(out, 3, *saved[3], total_limit=1)  # the next save cleans what the killed one left
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3"], k


def test_latest_skips_an_incomplete_checkpoint_with_a_warning(tmp_path):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, *tiny_state(step))
    (tmp_path / "checkpoint-2" / "optimizer.pt").write_bytes(b"cut")  # a partial copy, a disk gone bad
    warnings = []
    assert resolve_checkpoint(tmp_path, "latest", warn=warnings.append) == tmp_path / "checkpoint-1"
    assert len(warnings) == 1 and "skipping incomplete checkpoint" in warnings[0] and "optimizer.pt" in warnings[0]
    (tmp_path / "checkpoint-1" / "state.json").unlink()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path, "latest", warn=warnings.append)
    with pytest.raises(ValueError, match="incomplete checkpoint"):
        resolve_checkpoint(tmp_path, "checkpoint-2")
    assert missing_parts(tmp_path / "checkpoint-2") == ["optimizer.pt"]


def lora_files(out: Path) -> dict:
    return {name: load_file(out / name) for name in ("pytorch_lora_weights.safetensors",
                                                     "pytorch_lora_weights_kohya.safetensors")}


@pytest.fixture(scope="module")
def straight(default_model_dir, photos, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("straight") / "run"
    assert run_training(args(default_model_dir, photos, out, "--max_train_steps", "3",
                             "--checkpointing_steps", "1")) == 0
    return out


@pytest.mark.parametrize("phase, k", [("checkpoint-2", 5), ("checkpoint-2", 8),
                                      ("export", 1), ("export", 2)])
def test_a_run_killed_mid_save_resumes_to_the_same_lora(phase, k, straight, default_model_dir, photos,  # noqa: F811
                                                        tmp_path):
    """checkpoint-2 with a limit of 1: files 1-5, rename 6, then checkpoint-1 renamed away 7 and deleted 8-13.
    The export: diffusers file 1, its rename 2, the kohya file 3..."""
    out = tmp_path / "run"
    argv = args(default_model_dir, photos, out, "--max_train_steps", "3", "--checkpointing_steps", "1",
                "--checkpoints_total_limit", "1")
    script = f"import sys; sys.path.insert(0, {str(REPO)!r}); from tests.training.test_crash_safety import " \
             f"train_and_die; train_and_die({argv!r}, {phase!r}, {k})"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert any(not missing_parts(p) for p in list_checkpoints(out))
    assert run_training([*argv, "--resume_from_checkpoint", "latest"]) == 0
    got, want = lora_files(out), lora_files(straight)
    for name in want:
        assert got[name].keys() == want[name].keys() and all(torch.equal(got[name][t], want[name][t])
                                                             for t in want[name]), name
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # nothing half-written is left


def train_and_die(argv: list[str], phase: str, k: int) -> None:
    """In a child process: train, SIGKILLed after the k-th disk call of `phase` (a checkpoint or the export)."""
    from flatlora_diffusion.lora import formats
    from flatlora_diffusion.training import checkpoint as checkpoint_module

    original_checkpoint, original_finish = training.checkpoint, training.finish

    def checkpoint(run, step):
        if phase != f"checkpoint-{step}":
            return original_checkpoint(run, step)
        with killed_after(k, [checkpoint_module]):
            return original_checkpoint(run, step)

    def finish(run):
        with killed_after(k, [formats]):
            original_finish(run)

    training.checkpoint = checkpoint
    if phase == "export":
        training.finish = finish
    run_training(argv)


def test_resume_survives_a_half_written_metrics_line(tmp_path):
    from flatlora_diffusion.training.metrics import MetricsLog, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')  # killed mid-line
    MetricsLog(path, resume_step=2).write(step=3, loss=0.3)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_a_checkpoint_with_nan_weights_is_not_saved_and_the_good_one_stays(tmp_path):
    from flatlora_diffusion.errors import UserError

    save_checkpoint(tmp_path, 1, *tiny_state(1))
    models, optimizer, scheduler = tiny_state(2)
    with torch.no_grad():
        models["unet"].bias[1] = float("nan")
    with pytest.raises(UserError, match=r"not saving checkpoint-2: LoRA weight unet\.bias is NaN/inf; the last good "
                                        r"checkpoint is .*checkpoint-1"):
        save_checkpoint(tmp_path, 2, models, optimizer, scheduler, total_limit=1)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"] and not missing_parts(tmp_path / "checkpoint-1")
