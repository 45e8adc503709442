"""DreamBooth data: examples, per-epoch order, crops and flips, all derived from (seed, epoch).

Nothing here keeps RNG state: the order of epoch e and the augmentation of sample i in epoch e
are functions of (seed, e, i). Resume is therefore exact by construction, and under several
processes each rank reads its own slice of the same global order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flatlora_diffusion.errors import UserError

from .images import list_images, load_rgb, read_caption


@dataclass(frozen=True)
class Example:
    path: Path
    prompt: str
    size: tuple[int, int] = (0, 0)  # (height, width) after EXIF orientation, read when checked
    repeats: int = 1                # times per epoch (its subset's repeats)
    loss_weight: float = 1.0        # its subset's loss weight (prior_loss_weight for class images)
    mask: Path | None = None        # loss mask (data/masks.py), with --masked_loss
    subset: int = 0                 # index of its subset (data/dataset_config.py)


@dataclass(frozen=True)
class CropPlan:
    """Where an image is cut: known from its size and (seed, epoch, index) alone, before it is read."""
    resized: tuple[int, int]  # (w, h) after the cover resize
    top: int
    left: int                 # in the resized, unflipped image
    flipped: bool

    def recorded_top_left(self, width: int) -> tuple[int, int]:
        """The crop as SDXL's micro-conditioning records it (as seen in the flipped image)."""
        return (self.top, self.resized[0] - self.left - width if self.flipped else self.left)


@dataclass(frozen=True)
class Prepared:
    """One training image after resize and crop, with its SDXL micro-conditioning."""
    pixels: torch.Tensor            # (3, H, W) in [-1, 1]
    original_size: tuple[int, int]  # (h, w) of the file
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    target_size: tuple[int, int]    # (h, w) trained on
    flipped: bool = False

    @property
    def time_ids(self) -> torch.Tensor:
        return torch.tensor([*self.original_size, *self.crop_top_left, *self.target_size], dtype=torch.float32)


def derived_seed(*parts) -> int:
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def load_examples(folder: str | Path, prompt: str | None, caption_extension: str = ".txt",
                  what: str = "instance", **fields) -> list[Example]:
    """Every image of `folder`, each checked to decode, with its caption file or `prompt`.

    `fields`: the other Example fields, the same for every image of the folder (repeats, loss_weight).
    """
    examples = []
    for path in list_images(folder, what):
        img = load_rgb(path)  # a corrupt file fails now, naming the file, not in the middle of training
        caption = read_caption(path, caption_extension) or prompt
        if not caption:
            raise UserError(f"no prompt for {path}: give a caption file ({caption_extension}), an instance prompt, "
                            "or a folder named N_prompt")
        examples.append(Example(path, caption, (img.height, img.width), **fields))
    return examples


def folder_examples(folders, what: str, loss_weight: float = 1.0, subset: int = 0) -> list[Example]:
    """The examples of several ImageFolders (data/dataset_config.py), in order."""
    return [e for f in folders for e in load_examples(f.folder, f.prompt, f.caption_extension, what,
                                                      repeats=f.repeats, loss_weight=loss_weight, subset=subset)]


def subset_examples(subsets) -> list[Example]:
    """The instance examples of every subset, subset by subset."""
    return [e for k, s in enumerate(subsets) for e in folder_examples([s.images], "instance", s.loss_weight, k)]


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(derived_seed("order", seed, epoch)).permutation(n)


def is_flipped(random_flip: bool, seed: int, epoch: int, index: int) -> bool:
    """The flip of sample `index` in `epoch`: its own draw, so it is known without the image."""
    return random_flip and np.random.default_rng(derived_seed("flip", seed, epoch, index)).random() < 0.5


def plan_crop(original: tuple[int, int], size: int | tuple[int, int], center_crop: bool, random_flip: bool,
              seed: int, epoch: int, index: int) -> CropPlan:
    """Cover-resize `original` (h, w) to `size` (h, w; an int is a square), then a centre or random crop."""
    height, width = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(derived_seed("crop", seed, epoch, index))
    scale = max(width / original[1], height / original[0])
    resized = (max(width, round(original[1] * scale)), max(height, round(original[0] * scale)))
    if center_crop:
        top, left = (resized[1] - height) // 2, (resized[0] - width) // 2
    else:
        top = int(rng.integers(0, resized[1] - height + 1))
        left = int(rng.integers(0, resized[0] - width + 1))
    return CropPlan(resized, top, left, is_flipped(random_flip, seed, epoch, index))


def apply_crop(img: Image.Image, plan: CropPlan, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    """Resize, crop and flip `img` as `plan` says (images and their masks alike)."""
    height, width = size
    img = img.resize(plan.resized, resample).crop((plan.left, plan.top, plan.left + width, plan.top + height))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if plan.flipped else img


def prepare_image(img: Image.Image, size: int | tuple[int, int], center_crop: bool, random_flip: bool,
                  seed: int, epoch: int, index: int) -> Prepared:
    """Resize to cover `size` (h, w; an int is a square), crop it, maybe flip (as the diffusers SDXL script)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    plan = plan_crop((img.height, img.width), size, center_crop, random_flip, seed, epoch, index)
    array = np.asarray(apply_crop(img, plan, size, Image.Resampling.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    return Prepared(torch.from_numpy(array).permute(2, 0, 1).contiguous(), (img.height, img.width),
                    plan.recorded_top_left(size[1]), size, plan.flipped)
