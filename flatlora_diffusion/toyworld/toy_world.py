"""A procedural image world the tiny SDXL model can learn on a CPU: one flat shape on a flat background.

Every 64x64 RGB image shows one shape of one named colour on a background of another named
colour, and its caption says exactly that: "a red circle on a blue background". Images are
drawn at 4x resolution and box-downsampled, so edges are anti-aliased the same way each time.
Everything is a pure function of a seed (a `numpy.random.Generator`; the global RNG is never
touched), so a data set, a held-out split and its ground truth can be rebuilt anywhere.

Pretraining uses the five PRETRAIN_SHAPES only. SUBJECT_SHAPES are drawn by the same code but
kept out of pretraining, so a later DreamBooth run has subjects the model has never seen.
A deterministic set of (colour, shape, background) combinations is also held out of
pretraining, to measure whether the model composes words it has only seen apart.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from matplotlib.path import Path as PolygonPath

from flatlora_diffusion.sdxl.tokenizer import COLOURS as TOKEN_COLOURS
from flatlora_diffusion.sdxl.tokenizer import SHAPES as TOKEN_SHAPES

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # draw 4x larger, then average 4x4 blocks: smooth, reproducible edges
MIN_HALF_WIDTH, MAX_HALF_WIDTH = 8.0, 22.0  # in output pixels; the notes' range
MARGIN = 1.0  # keep the shape off the outermost pixels, which measure the background

# Eight colours far apart in RGB (closest pair ~110 apart), so "nearest named colour" is unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "cyan": (40, 200, 210),
    "purple": (140, 50, 170),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)
PRETRAIN_SHAPES = ("circle", "square", "triangle", "ring", "cross")
SUBJECT_SHAPES = ("star", "heart", "hexagon", "diamond")  # never drawn in pretraining
ALL_SHAPES = PRETRAIN_SHAPES + SUBJECT_SHAPES

assert set(COLOURS) <= set(TOKEN_COLOURS) and set(ALL_SHAPES) <= set(TOKEN_SHAPES), "words must be single tokens"

HOLDOUT_SEED = 9  # fixes which combinations are held out; changing it changes the evaluation split
HOLDOUT_COUNT = 64


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw one image, and therefore its ground truth."""

    shape: str
    colour: str
    background: str
    cx: float  # centre, in output pixels (0..64, x to the right, y down)
    cy: float
    half_width: float

    def __post_init__(self):
        if self.shape not in ALL_SHAPES:
            raise ValueError(f"Scene.shape: unknown shape {self.shape!r}; expected one of {ALL_SHAPES}")
        for field in ("colour", "background"):
            if getattr(self, field) not in PALETTE:
                raise ValueError(f"Scene.{field}: unknown colour {getattr(self, field)!r}; expected one of {COLOURS}")
        if self.colour == self.background:
            raise ValueError(f"Scene.colour: shape colour equals the background ({self.colour})")

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in output pixels; every shape fits in its half-width square."""
        r = self.half_width
        return (self.cx - r, self.cy - r, self.cx + r, self.cy + r)


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def ground_truth(scene: Scene) -> dict:
    """The measurable facts of an image: what world_metrics must recover from its pixels."""
    return {"shape": scene.shape, "colour": scene.colour, "background": scene.background, "bbox": scene.bbox}


# ---------------------------------------------------------------- combinations and the held-out split

Combo = tuple[str, str, str]  # (colour, shape, background)


def all_combos(shapes: tuple[str, ...] = PRETRAIN_SHAPES) -> list[Combo]:
    """Every (colour, shape, background) with colour != background, in a fixed order."""
    return [(c, s, b) for c, s, b in itertools.product(COLOURS, shapes, COLOURS) if c != b]


def _keeps_every_pair(train: set[Combo], candidate: Combo) -> bool:
    """True if removing `candidate` leaves each of its word pairs well covered in training.

    A held-out combination is a fair test of composition only if the model has seen each pair
    of its words together: (colour, shape) keeps >= 4 of 7 backgrounds, (colour, background)
    >= 3 of 5 shapes, (shape, background) >= 4 of 7 colours.
    """
    c, s, b = candidate
    rest = train - {candidate}
    return (sum(1 for x in rest if x[0] == c and x[1] == s) >= 4
            and sum(1 for x in rest if x[0] == c and x[2] == b) >= 3
            and sum(1 for x in rest if x[1] == s and x[2] == b) >= 4)


def held_out_combos() -> list[Combo]:
    """The HOLDOUT_COUNT combinations never shown in pretraining (deterministic, balanced by shape)."""
    combos = all_combos()
    order = np.random.default_rng(HOLDOUT_SEED).permutation(len(combos))
    quota = {s: HOLDOUT_COUNT // len(PRETRAIN_SHAPES) + (i < HOLDOUT_COUNT % len(PRETRAIN_SHAPES))
             for i, s in enumerate(PRETRAIN_SHAPES)}
    train, held = set(combos), []
    for i in order:
        combo = combos[i]
        if quota[combo[1]] > 0 and _keeps_every_pair(train, combo):
            train.discard(combo)
            held.append(combo)
            quota[combo[1]] -= 1
    if len(held) != HOLDOUT_COUNT:
        raise RuntimeError(f"could only hold out {len(held)} of {HOLDOUT_COUNT} combinations")
    return sorted(held)


def train_combos() -> list[Combo]:
    held = set(held_out_combos())
    return [combo for combo in all_combos() if combo not in held]


# ---------------------------------------------------------------- sampling

def sample_scene(rng: np.random.Generator, combos: list[Combo]) -> Scene:
    """One random scene: a combination drawn uniformly, a random size and a position inside the frame."""
    colour, shape, background = combos[rng.integers(len(combos))]
    r = float(rng.uniform(MIN_HALF_WIDTH, MAX_HALF_WIDTH))
    lo, hi = r + MARGIN, IMAGE_SIZE - r - MARGIN
    cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
    return Scene(shape, colour, background, cx, cy, r)


def sample_scenes(seed: int, n: int, combos: list[Combo]) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, combos) for _ in range(n)]


def generate(seed: int, n: int, combos: list[Combo] | None = None) -> tuple[np.ndarray, list[Scene]]:
    """`n` images (uint8, [n, 64, 64, 3]) and their scenes; the same seed gives identical pixels."""
    scenes = sample_scenes(seed, n, train_combos() if combos is None else combos)
    return render_many(scenes), scenes


# ---------------------------------------------------------------- drawing

def _star_polygon(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points  # first point straight up
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_STAR = PolygonPath(_star_polygon())


def _inside(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of points (x, y), in units of the half-width with y down, inside `shape`."""
    if shape == "circle":
        return x * x + y * y <= 1.0
    if shape == "square":
        return (np.abs(x) <= 1.0) & (np.abs(y) <= 1.0)
    if shape == "triangle":  # upright: apex at the top, base at the bottom
        return (y <= 1.0) & (np.abs(x) <= (y + 1.0) / 2.0)
    if shape == "ring":
        rr = x * x + y * y
        return (rr <= 1.0) & (rr >= 0.55 ** 2)
    if shape == "cross":
        ax, ay, arm = np.abs(x), np.abs(y), 1.0 / 3.0
        return ((ax <= arm) & (ay <= 1.0)) | ((ay <= arm) & (ax <= 1.0))
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= 1.0
    if shape == "hexagon":  # regular, circumradius 1, corners left and right
        ax, ay = np.abs(x), np.abs(y)
        return (ay <= np.sqrt(3) / 2) & (np.sqrt(3) * ax + ay <= np.sqrt(3))
    if shape == "heart":  # the classic sextic (x^2 + y^2 - 1)^3 <= x^2 y^3, scaled into the box
        u, v = 1.15 * x, -1.15 * y + 0.15
        return (u * u + v * v - 1.0) ** 3 <= u * u * v ** 3
    if shape == "star":
        points = np.stack(np.broadcast_arrays(x, y), axis=-1)
        return _STAR.contains_points(points.reshape(-1, 2)).reshape(points.shape[:-1])
    raise ValueError(f"unknown shape {shape!r}")


def coverage(scene: Scene, inside=None) -> np.ndarray:
    """Fraction of each output pixel covered by the shape, float32 [64, 64] in [0, 1].

    `inside(shape, x, y)` (default `_inside`) says which sample points are covered, in units of the
    half-width with y down; a style draws another figure in the same frame through it.
    """
    r = scene.half_width
    x0, x1 = max(0, int(np.floor(scene.cx - r)) - 1), min(IMAGE_SIZE, int(np.ceil(scene.cx + r)) + 1)
    y0, y1 = max(0, int(np.floor(scene.cy - r)) - 1), min(IMAGE_SIZE, int(np.ceil(scene.cy + r)) + 1)
    sub = (np.arange((x1 - x0) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE + x0  # sample-point centres
    suby = (np.arange((y1 - y0) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE + y0
    mask = (inside or _inside)(scene.shape, ((sub - scene.cx) / r)[None, :], ((suby - scene.cy) / r)[:, None])
    window = mask.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    out[y0:y1, x0:x1] = window
    return out


def render(scene: Scene, inside=None) -> np.ndarray:
    """The image of `scene` as uint8 [64, 64, 3] (`inside`: as in `coverage`)."""
    alpha = coverage(scene, inside)[..., None]
    fg = np.asarray(PALETTE[scene.colour], np.float32)
    bg = np.asarray(PALETTE[scene.background], np.float32)
    return np.rint(bg + (fg - bg) * alpha).astype(np.uint8)


def render_many(scenes: list[Scene], inside=None) -> np.ndarray:
    out = np.empty((len(scenes), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i, scene in enumerate(scenes):
        out[i] = render(scene, inside)
    return out
