"""atomic.py: outputs get the ordinary mode under the umask; a write that fails partway leaves nothing."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from flatlora_diffusion.atomic import OutputError, atomic_directory, atomic_file, remove_directory


@pytest.fixture
def umask():
    """Set a umask for the test, restore the previous one after."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                       (0o002, 0o664, 0o775)])
def test_outputs_get_the_mode_an_ordinary_write_gives(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    with atomic_file(tmp_path / "a.txt") as tmp:
        tmp.write_text("hello")
    with atomic_directory(tmp_path / "folder") as tmp:
        os.close(os.open(tmp / "inside.txt", os.O_CREAT | os.O_WRONLY, 0o600))  # as safetensors' writer does
    (tmp_path / "plain.txt").write_text("ordinary")  # what the user's own tools would make
    assert mode(tmp_path / "a.txt") == file_mode == mode(tmp_path / "plain.txt")
    assert mode(tmp_path / "folder") == dir_mode and mode(tmp_path / "folder" / "inside.txt") == file_mode


def _write_half_then_fail(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_disk_full_partway_is_one_output_error_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"the good old file")
    with pytest.raises(OutputError, match=f"cannot write {target}: disk full"):
        with atomic_file(target) as tmp:
            _write_half_then_fail(tmp, b"new content " * 100)
    assert target.read_bytes() == b"the good old file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


def test_disk_full_inside_a_folder_keeps_the_old_folder(tmp_path):
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    with pytest.raises(OutputError, match="disk full"):
        with atomic_directory(folder) as tmp:
            (tmp / "a.bin").write_bytes(b"1234")
            _write_half_then_fail(tmp / "b.bin", b"5678" * 10)
    assert [p.name for p in folder.iterdir()] == ["state.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


def test_other_os_errors_are_not_disguised(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_file(tmp_path / "a"):
            open(tmp_path / "missing" / "x")


def test_remove_directory_leaves_no_half_deleted_folder(tmp_path):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    remove_directory(folder)
    assert list(tmp_path.iterdir()) == []
