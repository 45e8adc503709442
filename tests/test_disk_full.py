"""Issue 14: a full disk or an unwritable output is one `error:` line, exit 2, and nothing half-written.

Root runs these tests here, and root ignores file permissions (a chmod'ed read-only folder is no
test for root): the disk is filled for real on a tiny tmpfs where the test may mount one, and a
patched write that fails partway stands in for it everywhere else.
"""

from __future__ import annotations

import errno
import subprocess
import uuid

import pytest

from flatlora_diffusion.lora import formats
from flatlora_diffusion.lora.convert import main as convert
from flatlora_diffusion.training.cli import run_training
from tests.lora.hostile_files import lora_of_random_weights
from tests.training.test_nonfinite import photos  # noqa: F401  (a fixture)
from tests.training.test_training_script import args


@pytest.fixture(scope="module")
def lora_file(default_model_dir, tmp_path_factory):
    return lora_of_random_weights(default_model_dir, tmp_path_factory.mktemp("lora"))[1]["kohya"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 32 KiB tmpfs (smaller than one LoRA file), or a skip where mounting is not allowed."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the patched-write tests cover this")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def test_converter_on_a_full_disk(lora_file, default_model_dir, tiny_disk, capsys):
    (tiny_disk / "keep.txt").write_text("already there")
    target = tiny_disk / "out.safetensors"
    assert convert([str(lora_file), str(target), "--to", "diffusers", "--base", str(default_model_dir)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"error: cannot write {target}: disk full; nothing was written there (the previous file, if " \
                   "any, is kept)"
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["keep.txt"]


def _fail_partway(real):
    """save_file that writes half of the file, then finds the disk full."""
    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
        raise OSError(errno.ENOSPC, "No space left on device", filename)
    return save_file


def test_converter_with_a_write_failing_partway(lora_file, default_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(formats, "save_file", _fail_partway(formats.save_file))
    target = tmp_path / "out.safetensors"
    assert convert([str(lora_file), str(target), "--to", "diffusers", "--base", str(default_model_dir)]) == 2
    assert "disk full" in one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_training_export_on_a_full_disk_keeps_the_checkpoint(default_model_dir, photos, tmp_path,  # noqa: F811
                                                            monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(formats, "save_file", _fail_partway(formats.save_file))
    code = run_training(args(default_model_dir, photos, out, "--checkpointing_steps", "2"))
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and line.startswith(f"error: cannot write {out / formats.DIFFUSERS_FILE}: disk full"), line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "config.json", "metrics.jsonl"]
    monkeypatch.undo()  # space freed: resuming writes the files
    assert run_training(args(default_model_dir, photos, out, "--checkpointing_steps", "2",
                             "--resume_from_checkpoint", "latest")) == 0
    assert (out / formats.KOHYA_FILE).is_file()


def test_training_checkpoint_on_a_full_disk_keeps_the_previous_one(default_model_dir, photos, tmp_path,  # noqa: F811
                                                                  monkeypatch, capsys):
    import flatlora_diffusion.training.checkpoint as checkpoint

    out = tmp_path / "run"
    real, calls = checkpoint.save_file, []
    monkeypatch.setattr(checkpoint, "save_file", lambda *a, **kw: calls.append(1) or (
        _fail_partway(real) if len(calls) == 2 else real)(*a, **kw))
    code = run_training(args(default_model_dir, photos, out, "--checkpointing_steps", "1"))
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and f"cannot write {out / 'checkpoint-2'}: disk full" in line, line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "config.json", "metrics.jsonl"]
