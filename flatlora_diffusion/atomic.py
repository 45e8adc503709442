"""Atomic writes: a reader sees either the old output or the complete new one, never half.

Temp files and folders come from mkstemp/mkdtemp, which create them 0600/0700 whatever the
umask; before they are renamed into place they get the mode an ordinary open()/mkdir() would
have given (0644/0755 under the usual umask 022), so other users and tools can read the outputs.
A write that fails for lack of space or permission becomes one OutputError naming the path, and
the temporary is removed: the old output, if any, is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from flatlora_diffusion.errors import UserError

# errno values that mean "this output cannot be written here", not a bug in the program
UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
_UMASK_LOCK = threading.Lock()


class OutputError(UserError):
    """An output could not be written (disk full, read-only or unwritable folder); nothing was half-written."""


def current_umask() -> int:
    """The process umask (os.umask can only be read by setting it; the lock keeps that short and safe)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def ordinary_mode(is_dir: bool = False) -> int:
    """The mode open(..., "w") (0666) or mkdir (0777) gives under the current umask."""
    return (0o777 if is_dir else 0o666) & ~current_umask()


def output_error(path: Path, code: int) -> OutputError:
    reason = "disk full" if code in (errno.ENOSPC, errno.EDQUOT) else os.strerror(code)
    return OutputError(f"cannot write {path}: {reason}; nothing was written there (the previous file, if any, "
                       "is kept)")


def os_errno(error: BaseException) -> int | None:
    """The errno of an OSError, or of a library's wrapper of one ("... (os error 28)", safetensors' Rust I/O)."""
    if isinstance(error, OSError):
        return error.errno
    found = re.search(r"\(os error (\d+)\)", str(error))
    return int(found.group(1)) if found else None


@contextlib.contextmanager
def unwritable_as_output_error(path: Path) -> Iterator[None]:
    """Turn disk-full and permission errors while writing `path` into one OutputError."""
    try:
        yield
    except Exception as error:
        code = os_errno(error)
        if code in UNWRITABLE:
            raise output_error(path, code) from None
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    with unwritable_as_output_error(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    try:
        with unwritable_as_output_error(path):
            yield Path(tmp)
            os.chmod(tmp, ordinary_mode())
            os.replace(tmp, path)
        _remove_stale_temporaries(path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _remove_stale_temporaries(path: Path) -> None:
    """Temp files of `path` that a killed process left behind (one writer per output: none is in use)."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it becomes `path` only if the block succeeds.

    An existing `path` is replaced only after the new folder is complete.
    """
    path = Path(path)
    with unwritable_as_output_error(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with unwritable_as_output_error(path):
            yield tmp
            _give_ordinary_modes(tmp)
            _replace_directory(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _give_ordinary_modes(folder: Path) -> None:
    """The folder, and everything in it, as open()/mkdir() would have made them (safetensors writes 0600)."""
    os.chmod(folder, ordinary_mode(is_dir=True))
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, ordinary_mode(is_dir=path.is_dir()))


def _replace_directory(tmp: Path, path: Path) -> None:
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def remove_directory(path: str | Path) -> None:
    """Delete a folder so that no reader ever sees it half-deleted: rename it to a hidden name first."""
    path = Path(path)
    doomed = path.parent / f".{path.name}.deleting"
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(path, doomed)
    shutil.rmtree(doomed)
