"""Masked loss: a grayscale mask beside an instance image says where to train (white = 1 = train).

The mask of `photo.jpg` is `photo.mask.png` beside it, or `masks/photo.<any image extension>` in
the same folder. It must have the image's size; it is resized, cropped and flipped with the
image's own CropPlan (so it follows square crops, buckets and flips), then averaged down to the
latent grid: each latent pixel weighs the fraction of its 8x8 patch that is white.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flatlora_diffusion.errors import UserError

from .examples import Example, apply_crop, plan_crop
from .images import IMAGE_EXTENSIONS, MASK_SUFFIX, open_oriented


def find_mask(image_path: Path) -> Path | None:
    beside = image_path.with_name(image_path.stem + MASK_SUFFIX)
    if beside.is_file():
        return beside
    for extension in sorted(IMAGE_EXTENSIONS):
        candidate = image_path.parent / "masks" / (image_path.stem + extension)
        if candidate.is_file():
            return candidate
    return None


def attach_masks(examples: list[Example]) -> tuple[list[Example], str]:
    """The examples with their masks, and the line to say once at start; no mask at all raises."""
    with_masks = [dataclasses.replace(e, mask=find_mask(e.path)) for e in examples]
    have = sum(e.mask is not None for e in with_masks)
    if not have:
        raise UserError("--masked_loss: no instance image has a mask (expected NAME.mask.png beside NAME.png, "
                        "or masks/NAME.png in its folder)")
    for e in with_masks:
        if e.mask is not None:
            load_mask(e.mask, e.size)  # a broken or mis-sized mask fails now, not mid-training
    return with_masks, (f"masked loss: {have} of {len(with_masks)} instance images have a mask; "
                        f"{len(with_masks) - have} train everywhere")


def load_mask(path: Path, image_size: tuple[int, int]) -> Image.Image:
    """The mask as 8-bit grayscale (EXIF orientation applied, alpha ignored); it must match (h, w)."""
    img = open_oriented(path, "mask")
    if (img.height, img.width) != tuple(image_size):
        raise UserError(f"mask {path} is {img.width}x{img.height}, its image is {image_size[1]}x{image_size[0]}")
    return img.convert("RGB").convert("L")


def pixel_mask(example: Example, size: tuple[int, int], center_crop: bool, random_flip: bool, seed: int,
               epoch: int, index: int) -> torch.Tensor:
    """(1, H, W) in [0, 1]: the mask cut exactly as `prepare_image` cuts the image; ones without a mask."""
    if example.mask is None:
        return torch.ones(1, *size)
    plan = plan_crop(example.size, size, center_crop, random_flip, seed, epoch, index)
    cut = apply_crop(load_mask(example.mask, example.size), plan, size, Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(cut, dtype=np.float32) / 255.0)[None]


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Average a (1, H, W) pixel mask over each latent pixel's patch: (1, h, w)."""
    return torch.nn.functional.adaptive_avg_pool2d(mask[None], latent_size)[0]
