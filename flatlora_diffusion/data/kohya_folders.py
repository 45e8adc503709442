"""kohya sd-scripts' folder convention: a parent folder of `N_prompt/` subfolders.

`10_sks dog/` is a subset of 10 repeats whose images default to the prompt "sks dog". The rule
mirrors `generate_dreambooth_subsets_config_by_subdirs` in kohya's library/config_util.py: the
name is split at "_", the first piece must parse as an integer (else the folder is ignored, with a
warning), the rest joined back with "_" is the prompt ("10" alone gives no prompt), and folders of
fewer than 1 repeat are ignored. kohya reads regularisation (class) folders the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flatlora_diffusion.errors import UserError

from .images import IMAGE_EXTENSIONS, MASK_SUFFIX


@dataclass(frozen=True)
class KohyaFolder:
    path: Path
    repeats: int
    prompt: str | None  # None when the name is just the number


def parse_folder_name(name: str) -> tuple[int, str | None] | None:
    """(repeats, prompt) of an `N_prompt` folder name, or None when it does not follow the convention."""
    number, _, prompt = name.partition("_")
    try:
        repeats = int(number)
    except ValueError:
        return None
    return repeats, (prompt or None)


def _has_images(folder: Path) -> bool:
    return any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.lower().endswith(MASK_SUFFIX)
               and not p.name.startswith(".") for p in folder.iterdir())


def kohya_subfolders(parent: str | Path, what: str = "instance") -> tuple[list[KohyaFolder], list[str]] | None:
    """The `N_prompt` subfolders of `parent` (sorted by name) and the names ignored, or None when
    `parent` is an ordinary image folder (or missing: the caller reports that)."""
    parent = Path(parent)
    if not parent.is_dir():
        return None
    try:
        subfolders = sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    except PermissionError:
        return None
    found, ignored = [], []
    for sub in subfolders:
        parsed = parse_folder_name(sub.name)
        if parsed is None or parsed[0] < 1:
            ignored.append(sub.name)
        else:
            found.append(KohyaFolder(sub, *parsed))
    if not found:
        return None
    if _has_images(parent):
        raise UserError(f"{what} folder {parent} holds both images and N_prompt subfolders "
                        f"({found[0].path.name}, ...): move the images into a subfolder such as 1_<prompt>")
    return found, ignored
