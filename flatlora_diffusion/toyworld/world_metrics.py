"""Measure what a 64x64 toy-world image shows: background colour, shape colour and shape.

The colours need no learning: the outermost pixels are background (the world keeps shapes off
them), and the pixels far from that background colour are the shape; each set votes for its
nearest named colour. The shape is read by a tiny CNN (`ShapeClassifier`, weights in
assets/shape_classifier.safetensors, retrained by `python -m flatlora_diffusion.toyworld.train_shape_classifier`)
that sees only a colour-free, size-free view of the shape: the shape's coverage map, cropped to
its largest blob and resized to 32x32. Its held-out accuracy is stated in that module's docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from .toy_world import ALL_SHAPES, PALETTE

CLASSIFIER_PATH = Path(__file__).parents[1] / "assets" / "shape_classifier.safetensors"
PALETTE_NAMES = tuple(PALETTE)
PALETTE_RGB = np.asarray(list(PALETTE.values()), np.float32)
# A pixel belongs to the shape if it is this far (RGB) from the background: ~0.4 of the closest
# palette pair (blue/purple, 114 apart), so anti-aliased edges count but VAE noise does not.
FOREGROUND_DISTANCE = 45.0
CROP_SIZE = 32


@dataclass(frozen=True)
class Measurement:
    """What an image shows; `colour` and `shape` are None when no shape is visible."""

    colour: str | None
    shape: str | None
    background: str


def nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """Index into PALETTE_NAMES of the nearest named colour of each RGB pixel ([..., 3] -> [...])."""
    d = np.square(pixels[..., None, :].astype(np.float32) - PALETTE_RGB).sum(-1)
    return d.argmin(-1)


def border_pixels(image: np.ndarray) -> np.ndarray:
    """The outermost ring of pixels, [4 * 64 - 4, 3]."""
    return np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])


def background_colour(image: np.ndarray) -> str:
    """The named colour most border pixels are nearest to."""
    return PALETTE_NAMES[np.bincount(nearest_colour(border_pixels(image)), minlength=len(PALETTE)).argmax()]


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """Pixels far from the measured (median border) background colour, bool [64, 64]."""
    bg = np.median(border_pixels(image).astype(np.float32), axis=0)
    return np.linalg.norm(image.astype(np.float32) - bg, axis=-1) > FOREGROUND_DISTANCE


def _core(mask: np.ndarray) -> np.ndarray:
    """The mask without its edge pixels, whose anti-aliased colours mix shape and background."""
    core = ndimage.binary_erosion(mask)
    return core if core.any() else mask


def foreground_colour(image: np.ndarray, background: str | None = None) -> str | None:
    """The named colour most interior shape pixels are nearest to (never the background); None if no shape."""
    mask = foreground_mask(image)
    if not mask.any():
        return None
    votes = np.bincount(nearest_colour(image[_core(mask)]), minlength=len(PALETTE)).astype(np.float64)
    votes[PALETTE_NAMES.index(background or background_colour(image))] = -1.0
    return PALETTE_NAMES[int(votes.argmax())]


def shape_view(image: np.ndarray) -> np.ndarray:
    """Colour-free, position-free, size-free view of the shape: float32 [32, 32] in [0, 1].

    Each pixel's position between the background colour and the shape colour (its coverage),
    cropped to a square around the largest blob and resized. All zeros when no shape is visible.
    """
    mask = foreground_mask(image)
    if not mask.any():
        return np.zeros((CROP_SIZE, CROP_SIZE), np.float32)
    pixels = image.astype(np.float32)
    bg = np.median(border_pixels(pixels), axis=0)
    fg = np.median(pixels[_core(mask)], axis=0)
    axis = fg - bg
    alpha = np.clip((pixels - bg) @ axis / max(float(axis @ axis), 1e-6), 0.0, 1.0)
    labels, count = ndimage.label(mask)
    largest = 1 + np.bincount(labels.ravel(), minlength=count + 1)[1:].argmax()
    ys, xs = np.nonzero(labels == largest)
    return _square_crop(alpha, ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)


def _square_crop(alpha: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Crop a square (one pixel of margin) centred on the box, zero-padded, resized to CROP_SIZE."""
    side = max(y1 - y0, x1 - x0) + 2
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    top, left = int(round(cy - side / 2)), int(round(cx - side / 2))
    padded = np.pad(alpha, side)
    crop = padded[top + side:top + 2 * side, left + side:left + 2 * side]
    resized = F.interpolate(torch.from_numpy(crop)[None, None], size=(CROP_SIZE, CROP_SIZE),
                            mode="bilinear", antialias=True, align_corners=False)
    return resized[0, 0].numpy()


class ShapeClassifier(nn.Module):
    """Four conv blocks on the 32x32 shape view, then a linear layer over ALL_SHAPES (~60k parameters)."""

    def __init__(self, classes: tuple[str, ...] = ALL_SHAPES):
        super().__init__()
        self.classes = classes
        widths = (1, 16, 32, 64, 64)
        self.features = nn.Sequential(*[
            layer for c_in, c_out in zip(widths, widths[1:])
            for layer in (nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))])
        self.head = nn.Linear(widths[-1] * (CROP_SIZE // 16) ** 2, len(classes))

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """Logits [n, classes] for views [n, 32, 32]."""
        return self.head(self.features(views[:, None]).flatten(1))


def load_shape_classifier(path: str | Path = CLASSIFIER_PATH) -> ShapeClassifier:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run python -m flatlora_diffusion.toyworld.train_shape_classifier")
    model = ShapeClassifier()
    model.load_state_dict(load_file(path))
    return model.eval()


@torch.no_grad()
def classify_shapes(images: np.ndarray, model: ShapeClassifier | None = None) -> list[str | None]:
    """Shape name for each uint8 image [n, 64, 64, 3]; None where no shape is visible."""
    model = model or load_shape_classifier()
    views = np.stack([shape_view(image) for image in images])
    names = [model.classes[i] for i in model(torch.from_numpy(views)).argmax(-1).tolist()]
    return [name if view.any() else None for name, view in zip(names, views)]


def measure(images: np.ndarray, model: ShapeClassifier | None = None) -> list[Measurement]:
    """Measure each uint8 image [n, 64, 64, 3]."""
    shapes = classify_shapes(images, model)
    out = []
    for image, shape in zip(images, shapes):
        background = background_colour(image)
        out.append(Measurement(foreground_colour(image, background), shape, background))
    return out
