"""Where the Train tab may read and write: only under the runs root, only images, safe names.

A browser (or an API client) sends file names and folder choices the server must not trust:
`../../.bashrc`, `/etc/passwd`, a symlink out of the runs root, an `.exe` named `.png`. Every
name is reduced to a plain file name of safe characters, every path is resolved and checked to
lie inside the runs root, and every uploaded file must open as an image of an allowed format.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .runs import AppError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "BMP"}  # what PIL must recognise in the bytes, whatever the name says
MAX_NAME = 80
MAX_UPLOADS = 200
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
SKIPPED_FOLDERS = ("checkpoint-", "samples", ".")  # a run's own outputs are not instance images


def safe_name(name: str, fallback: str = "file") -> str:
    """`name`'s last path part with anything but letters, digits, '.', '_' and '-' replaced by '_'."""
    last = re.split(r"[\\/]", str(name))[-1]
    cleaned = _UNSAFE.sub("_", last).strip("._-")  # no hidden files, no '..'
    return cleaned[:MAX_NAME] or fallback


def inside(path: Path, root: Path) -> Path:
    """`path` resolved (symlinks followed); AppError unless it lies inside `root`."""
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(Path(root).resolve()):
        raise AppError(f"{path}: outside the runs folder {root}; only folders under it can be used")
    return resolved


def store_uploads(files: list[str | Path], dest: Path, root: Path) -> list[Path]:
    """Move uploaded images into `dest` (inside `root`) under safe, distinct names.

    Everything is checked before anything is stored: a rejected file leaves `dest` untouched.
    """
    if not files:
        raise AppError("upload instance images or choose a folder of them")
    if len(files) > MAX_UPLOADS:
        raise AppError(f"{len(files)} files uploaded; at most {MAX_UPLOADS} instance images")
    dest = inside(dest, root)
    planned, taken = [], set()
    for file in files:
        check_image(Path(file))
        target = _distinct(safe_name(Path(file).name, "image"), taken)
        planned.append((Path(file), dest / target))
    dest.mkdir(parents=True, exist_ok=True)
    for source, target in planned:
        # move, not copy: the upload is then stored under the runs root only
        shutil.move(str(source), target)
    return [target for _, target in planned]


def check_image(path: Path) -> None:
    """AppError unless `path` has an image suffix and its bytes are an image of that kind."""
    name = path.name
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise AppError(f"{name}: not an image file ({', '.join(IMAGE_SUFFIXES)} only)")
    try:
        with Image.open(path) as image:
            kind = image.format
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise AppError(f"{name}: not a readable image") from None
    if kind not in IMAGE_FORMATS:
        raise AppError(f"{name}: a {kind} file; only {', '.join(sorted(IMAGE_FORMATS))} images are accepted")


def _distinct(name: str, taken: set[str]) -> str:
    stem, suffix = Path(name).stem, Path(name).suffix.lower()
    candidate, n = f"{stem}{suffix}", 1
    while candidate.lower() in taken:
        n += 1
        candidate = f"{stem}_{n}{suffix}"
    taken.add(candidate.lower())
    return candidate


def image_folders(root: Path | None, depth: int = 2) -> list[str]:
    """Folders under `root` (relative names, at most `depth` levels down) that hold images."""
    if root is None or not root.is_dir():
        return []
    root = root.resolve()
    found = []
    for folder in _folders(root, depth):
        if folder.resolve().is_relative_to(root) and any(
                p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in folder.iterdir()):
            found.append(folder.relative_to(root).as_posix())
    return sorted(found)


def _folders(folder: Path, depth: int):
    if depth == 0:
        return
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(SKIPPED_FOLDERS)):
        yield child
        yield from _folders(child, depth - 1)


def chosen_folder(choice: str, root: Path) -> Path:
    """The folder the form names (relative to the runs root); AppError if outside or without images."""
    folder = inside(Path(root) / choice, root)
    if not folder.is_dir():
        raise AppError(f"{choice}: no such folder under {root}")
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
        raise AppError(f"{choice}: no images ({', '.join(IMAGE_SUFFIXES)}) in that folder")
    return folder
