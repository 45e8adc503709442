"""A visual style for the toy world, drawn on any shape and colour, and its ground-truth detector.

The style is *hollow* ("... in sks style" in the style task): the shape keeps its outline, a band
about 0.45 of its half-width wide, and its middle shows the background. It uses only the image's own
two colours, because the world's VAE was trained on two-colour images and blurs anything else: a
dark outline in a third colour came back from a VAE round trip as a smeared green-brown halo
(outline detector at 0.1-0.9 on the training images themselves), while a hollow shape is drawn
like the world's ring. Shapes: STYLE_SHAPES (a hollow circle is the world's ring, which is why
the ring itself is left out; the cross's arms are too thin to hollow).

Measured without learning:
- `hollow_fraction`: the share of the shape's filled silhouette that is a hole (background inside
  it): 0 for a plain shape, HOLE_FRACTION[shape] for a styled one; `style_score` divides by the
  expected share, so ground truth scores ~1 styled and 0 plain;
- `destyle`: the image with the hole painted in the shape colour, so that world_metrics measures
  the content (shape, shape colour, background) as on a plain image.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from . import world_metrics
from .toy_world import PALETTE, Scene, _inside, render, render_many

STYLE_SHAPES = ("circle", "square", "triangle")
STYLE_COLOURS = tuple(PALETTE)
# The hole: the shape shrunk by SHRINK about its incentre (in units of the half-width, y down), so the
# band is ~0.45 half-widths wide for circle and square (the ring's 0.55) and ~0.4 for the triangle.
SHRINK = {"circle": 0.55, "square": 0.55, "triangle": 0.35}
# the upright triangle (apex (0, -1), base y = 1, half-base 1) has inradius area / semiperimeter = 2 / (1 + sqrt 5)
INCENTRE = {"circle": (0.0, 0.0), "square": (0.0, 0.0), "triangle": (0.0, 1.0 - 2.0 / (1.0 + np.sqrt(5.0)))}
HOLE_FRACTION = {shape: k * k for shape, k in SHRINK.items()}  # hole area / filled area on ground truth
STYLED_THRESHOLD = 0.3  # "has the style": a hole of at least 0.3 of the expected one (the VAE blurs holes smaller)


def check_style_scene(scene: Scene) -> None:
    if scene.shape not in STYLE_SHAPES:
        raise ValueError(f"the hollow style is drawn on {STYLE_SHAPES} only, not on a {scene.shape}")


def hollow_inside(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample points (units of the half-width, y down) inside the hollow `shape`: in it, not in its hole."""
    k, (ix, iy) = SHRINK[shape], INCENTRE[shape]
    return _inside(shape, x, y) & ~_inside(shape, (x - ix) / k + ix, (y - iy) / k + iy)


def render_styled(scene: Scene) -> np.ndarray:
    """The image of `scene` in the hollow style, uint8 [64, 64, 3]."""
    check_style_scene(scene)
    return render(scene, hollow_inside)


def render_styled_many(scenes: list[Scene]) -> np.ndarray:
    for scene in scenes:
        check_style_scene(scene)
    return render_many(scenes, hollow_inside)


# ---------------------------------------------------------------- measurement

def _largest_blob(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    return labels == 1 + np.bincount(labels.ravel(), minlength=count + 1)[1:].argmax()


def hole_mask(image: np.ndarray) -> np.ndarray:
    """Background-coloured pixels enclosed by the shape (its largest blob), bool [64, 64]."""
    shape = _largest_blob(world_metrics.foreground_mask(image))
    return ndimage.binary_fill_holes(shape) & ~shape


def hollow_fraction(image: np.ndarray) -> float:
    """Hole area / filled silhouette area of the shape; 0 when no shape is visible."""
    shape = _largest_blob(world_metrics.foreground_mask(image))
    filled = ndimage.binary_fill_holes(shape)
    return float((filled & ~shape).sum() / filled.sum()) if filled.any() else 0.0


def style_score(image: np.ndarray, shape: str | None) -> float:
    """hollow_fraction relative to the expected hole of `shape` (the measured one), capped at 1."""
    expected = HOLE_FRACTION.get(shape, min(HOLE_FRACTION.values()))
    return min(1.0, hollow_fraction(image) / expected)


def destyle(image: np.ndarray) -> np.ndarray:
    """The image with the shape's hole painted in the shape colour (a plain image of the same content)."""
    hole = hole_mask(image)
    if not hole.any():
        return image
    mask = world_metrics.foreground_mask(image)
    out = image.copy()
    out[hole] = np.rint(np.median(image[ndimage.binary_erosion(mask) if ndimage.binary_erosion(mask).any()
                                        else mask].astype(np.float32), axis=0)).astype(np.uint8)
    return out


def measure_styled(images: np.ndarray, classifier=None) -> tuple[list[world_metrics.Measurement], list[float]]:
    """(content measurements of the destyled images, style scores) of uint8 images [n, 64, 64, 3]."""
    if not len(images):
        return [], []
    content = world_metrics.measure(np.stack([destyle(im) for im in images]), classifier)
    return content, [style_score(im, m.shape) for im, m in zip(images, content)]
