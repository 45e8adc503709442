"""Which folders a run trains on: the subsets of `--dataset_config data.toml`, or of the flags.

A subset is one folder of instance images with its default prompt (caption files override it),
its repeats and loss weight, and optionally a class pool for prior preservation. The flags give
one subset, or one per `N_prompt/` subfolder when `--instance_data_dir` follows kohya's
convention (data/kohya_folders.py). The TOML file:

    [[subsets]]
    folder = "dog"                  # relative to the TOML file's folder
    prompt = "a photo of sks dog"
    repeats = 10
    class_folder = "class_dog"      # optional: prior preservation for this subset
    class_prompt = "a photo of a dog"
    prior_loss_weight = 1.0
    loss_weight = 1.0
"""

from __future__ import annotations

import sys
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from flatlora_diffusion.errors import UserError

from .kohya_folders import kohya_subfolders

SUBSET_KEYS = {"folder": str, "prompt": str, "repeats": int, "caption_extension": str, "class_folder": str,
               "class_prompt": str, "prior_loss_weight": float, "loss_weight": float}


@dataclass(frozen=True)
class ImageFolder:
    folder: str
    prompt: str | None  # the default prompt of its images; a caption file overrides it
    repeats: int = 1
    caption_extension: str = ".txt"


@dataclass(frozen=True)
class ClassPool:
    """Class images for prior preservation; subsets with equal pools share one stream."""
    folders: tuple[ImageFolder, ...]
    prior_loss_weight: float = 1.0
    generate: bool = True  # fill the (single) folder up to --num_class_images with its prompt


@dataclass(frozen=True)
class Subset:
    images: ImageFolder
    classes: ClassPool | None = None
    loss_weight: float = 1.0


def subsets_as_dicts(subsets: list[Subset]) -> list[dict]:
    """What config.json records."""
    return [asdict(s) for s in subsets]


def resolve_subsets(config) -> list[Subset]:
    """The run's subsets from --dataset_config or from the single-folder flags (a TrainConfig)."""
    if config.dataset_config:
        return load_dataset_config(config.dataset_config, config.caption_extension)
    return subsets_from_flags(config)


# ------------------------------------------------------------------ the flags

def subsets_from_flags(config) -> list[Subset]:
    classes = _class_pool_from_flags(config) if config.with_prior_preservation else None
    kohya = kohya_subfolders(config.instance_data_dir)
    if kohya is None:
        images = ImageFolder(str(config.instance_data_dir), config.instance_prompt, config.repeats,
                             config.caption_extension)
        return [Subset(images, classes)]
    found, ignored = kohya
    if config.repeats != 1:
        raise UserError(f"--repeats cannot be combined with the N_prompt subfolders of {config.instance_data_dir}: "
                        "the repeats come from the folder names")
    _warn_ignored(config.instance_data_dir, ignored)
    return [Subset(ImageFolder(str(k.path), k.prompt or config.instance_prompt, k.repeats, config.caption_extension),
                   classes) for k in found]


def _class_pool_from_flags(config) -> ClassPool:
    kohya = kohya_subfolders(config.class_data_dir, what="class")
    if kohya is None:
        folder = ImageFolder(str(config.class_data_dir), config.class_prompt, 1, config.caption_extension)
        return ClassPool((folder,), config.prior_loss_weight)
    found, ignored = kohya
    _warn_ignored(config.class_data_dir, ignored)
    # kohya's regularisation folders: existing images only, each folder's repeats weight its share
    folders = tuple(ImageFolder(str(k.path), k.prompt or config.class_prompt, k.repeats, config.caption_extension)
                    for k in found)
    return ClassPool(folders, config.prior_loss_weight, generate=False)


def _warn_ignored(parent, ignored: list[str]) -> None:
    if ignored:
        print(f"warning: {parent}: ignoring {len(ignored)} folder(s) not named N_prompt: {', '.join(ignored)}",
              file=sys.stderr)


# ------------------------------------------------------------------ the TOML file

def load_dataset_config(path: str | Path, caption_extension: str = ".txt") -> list[Subset]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"dataset config not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid TOML ({err})") from None
    unknown = sorted(set(data) - {"subsets"})
    if unknown:
        raise UserError(f"{path}: unknown setting(s) {', '.join(unknown)} (expected [[subsets]] tables)")
    tables = data.get("subsets")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise UserError(f"{path}: no subsets: add at least one [[subsets]] table with a folder")
    return [_subset(path, k, table, caption_extension) for k, table in enumerate(tables)]


def _subset(path: Path, k: int, table: dict, caption_extension: str) -> Subset:
    where = f"{path}: subset {k + 1}"
    unknown = sorted(set(table) - set(SUBSET_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(SUBSET_KEYS)})")
    values = {name: _typed(where, name, value) for name, value in table.items()}
    if "folder" not in values:
        raise UserError(f"{where}: 'folder' is required")
    if values.get("repeats", 1) < 1:
        raise UserError(f"{where}: repeats must be >= 1, got {values['repeats']}")
    for name in ("loss_weight", "prior_loss_weight"):
        if values.get(name, 1.0) <= 0:
            raise UserError(f"{where}: {name} must be > 0, got {values[name]}")
    if ("class_folder" in values) != ("class_prompt" in values):
        raise UserError(f"{where}: class_folder and class_prompt go together (prior preservation needs both)")
    if "prior_loss_weight" in values and "class_folder" not in values:
        raise UserError(f"{where}: prior_loss_weight is set but class_folder is not")
    extension = values.get("caption_extension", caption_extension)
    images = ImageFolder(str(path.parent / values["folder"]), values.get("prompt"), values.get("repeats", 1),
                         extension)
    classes = None
    if "class_folder" in values:
        folder = ImageFolder(str(path.parent / values["class_folder"]), values["class_prompt"], 1, extension)
        classes = ClassPool((folder,), values.get("prior_loss_weight", 1.0))
    return Subset(images, classes, values.get("loss_weight", 1.0))


def _typed(where: str, name: str, value):
    kind = SUBSET_KEYS[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UserError(f"{where}: {name} must be {kind.__name__}, got {value!r}")
    if kind is str and not value.strip():
        raise UserError(f"{where}: {name} is empty")
    return value
