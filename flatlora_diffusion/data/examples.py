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

from .images import list_images, load_rgb, read_caption


@dataclass(frozen=True)
class Example:
    path: Path
    prompt: str
    size: tuple[int, int] = (0, 0)  # (height, width) after EXIF orientation, read when checked


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


def load_examples(folder: str | Path, prompt: str, caption_extension: str = ".txt",
                  what: str = "instance") -> list[Example]:
    """Every image of `folder`, each checked to decode, with its caption file or `prompt`."""
    examples = []
    for path in list_images(folder, what):
        img = load_rgb(path)  # a corrupt file fails now, naming the file, not in the middle of training
        examples.append(Example(path, read_caption(path, caption_extension) or prompt, (img.height, img.width)))
    return examples


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(derived_seed("order", seed, epoch)).permutation(n)


def is_flipped(random_flip: bool, seed: int, epoch: int, index: int) -> bool:
    """The flip of sample `index` in `epoch`: its own draw, so it is known without the image."""
    return random_flip and np.random.default_rng(derived_seed("flip", seed, epoch, index)).random() < 0.5


def prepare_image(img: Image.Image, size: int | tuple[int, int], center_crop: bool, random_flip: bool,
                  seed: int, epoch: int, index: int) -> Prepared:
    """Resize to cover `size` (h, w; an int is a square), crop it, maybe flip (as the diffusers SDXL script)."""
    height, width = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(derived_seed("crop", seed, epoch, index))
    original = (img.height, img.width)
    scale = max(width / img.width, height / img.height)
    resized = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(resized, Image.Resampling.BICUBIC)
    if center_crop:
        top, left = (img.height - height) // 2, (img.width - width) // 2
    else:
        top = int(rng.integers(0, img.height - height + 1))
        left = int(rng.integers(0, img.width - width + 1))
    img = img.crop((left, top, left + width, top + height))
    flipped = is_flipped(random_flip, seed, epoch, index)
    if flipped:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = resized[0] - left - width  # the crop as seen in the flipped image
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return Prepared(torch.from_numpy(array).permute(2, 0, 1).contiguous(), original, (top, left),
                    (height, width), flipped)
