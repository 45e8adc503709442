"""The benchmark's tasks: what a LoRA is trained on, which prompts test it, and how the world scores them.

Two tasks share one set of metric names (so the protocol, the statistics and the report serve both):

- fidelity_in: the concept shows on in-domain prompts (the training combinations, new draws);
- fidelity_out: the concept shows on out-of-domain prompts (combinations never trained on);
- adherence: out-of-domain images whose shape colour and background are the asked ones;
- joint_out: out-of-domain images with the concept *and* the whole asked content;
- leak: out-of-domain images showing a training colour (shape colour or background) not asked;
- prior: prompts without the trigger (pretraining captions) drawn fully right and without the concept;
- prior_leak: prompts without the trigger that show the concept anyway.

**style** (the default): the *hollow* style (toyworld/styles.py: the shape's middle shows the
background) bound to "in sks style", trained on 24 images of 8 (colour, shape, background)
combinations (shape colours red/yellow, backgrounds white/blue, circles and squares); out of domain
= other shape colours on other backgrounds, on circles, squares and triangles (never seen styled).
Prompts without the trigger leave out the ring, which is a hollow circle.

**subject**: a star (a shape never drawn in pretraining), yellow on purple in its 5 instance images,
bound to "sks"; in domain = the instance prompt, out of domain = other colours and backgrounds.

**subject_contexts**: the same yellow star photographed, as DreamBooth guides ask, in several
contexts: 12 instance images on purple, white and blue backgrounds (4 each); in domain = those
prompts, out of domain = other star colours on backgrounds outside the three.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flatlora_diffusion.atomic import atomic_directory
from flatlora_diffusion.toyworld import styles, toy_world
from flatlora_diffusion.toyworld.world_metrics import Measurement, measure

TOKEN = "sks"
PROMPT_SEED = 7  # fixes which prompts of each set are used
METRICS = ("fidelity_in", "fidelity_out", "adherence", "joint_out", "leak", "prior", "prior_leak")


@dataclass(frozen=True)
class Prompted:
    """One prompt and the combination it asks for."""

    prompt: str
    combo: toy_world.Combo  # (colour, shape, background)


def _pick(items: list, n: int, seed: int) -> list:
    """`n` items in a fixed pseudo-random choice (repeating the list when n is larger)."""
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[order[i % len(items)]] for i in range(n)]


def prior_prompts(n: int, skip_shapes: tuple[str, ...] = ()) -> list[Prompted]:
    """Pretraining captions without the trigger (combinations seen in pretraining, not of `skip_shapes`)."""
    combos = _pick([c for c in toy_world.train_combos() if c[1] not in skip_shapes], n, PROMPT_SEED + 1)
    return [Prompted(toy_world.caption(*c), c) for c in combos]


def _content_right(m: Measurement, combo: toy_world.Combo, shape_counts: bool = True) -> bool:
    colour, shape, background = combo
    return m.colour == colour and m.background == background and (m.shape == shape or not shape_counts)


class StyleTask:
    name = "style"
    trigger = f"in {TOKEN} style"
    train_colours = ("red", "yellow")
    train_backgrounds = ("white", "blue")
    train_shapes = ("circle", "square")
    images_per_combo = 3
    data_seed = 321

    def train_combos(self) -> list[toy_world.Combo]:
        return [(c, s, b) for c, s, b in itertools.product(self.train_colours, self.train_shapes,
                                                           self.train_backgrounds)]

    def out_combos(self) -> list[toy_world.Combo]:
        """Shape colour and background both outside the training ones; every style shape (triangle unseen)."""
        colours = [c for c in styles.STYLE_COLOURS if c not in self.train_colours]
        backgrounds = [b for b in styles.STYLE_COLOURS if b not in self.train_backgrounds]
        return [(c, s, b) for c in colours for s in styles.STYLE_SHAPES for b in backgrounds if c != b]

    def prompt(self, combo: toy_world.Combo) -> str:
        return f"{toy_world.caption(*combo)} {self.trigger}"

    def training_scenes(self) -> list[toy_world.Scene]:
        rng = np.random.default_rng(self.data_seed)
        return [toy_world.sample_scene(rng, [combo]) for combo in self.train_combos()
                for _ in range(self.images_per_combo)]

    def training_images(self) -> tuple[np.ndarray, list[str]]:
        scenes = self.training_scenes()
        return styles.render_styled_many(scenes), [self.prompt((s.colour, s.shape, s.background)) for s in scenes]

    def prompt_sets(self, n_in: int, n_out: int, n_prior: int) -> dict[str, list[Prompted]]:
        return {"in": [Prompted(self.prompt(c), c) for c in _pick(self.train_combos(), n_in, PROMPT_SEED)],
                "out": [Prompted(self.prompt(c), c) for c in _pick(self.out_combos(), n_out, PROMPT_SEED + 2)],
                # a plain ring is a hollow circle: it would read as the style
                "prior": prior_prompts(n_prior, skip_shapes=("ring",))}

    def score(self, sets: dict[str, list[Prompted]], images: dict[str, np.ndarray], classifier) -> dict[str, float]:
        content_in, style_in = styles.measure_styled(images["in"], classifier)
        content_out, style_out = styles.measure_styled(images["out"], classifier)
        prior_measured = measure(images["prior"], classifier)
        prior_style = [styles.style_score(im, m.shape) for im, m in zip(images["prior"], prior_measured)]
        has = [s >= styles.STYLED_THRESHOLD for s in style_out]
        asked = [_content_right(m, p.combo, shape_counts=False) for m, p in zip(content_out, sets["out"])]
        whole = [_content_right(m, p.combo) for m, p in zip(content_out, sets["out"])]
        leak = [m.colour in self.train_colours or m.background in self.train_backgrounds for m in content_out]
        prior_styled = [s >= styles.STYLED_THRESHOLD for s in prior_style]
        prior_ok = [_content_right(m, p.combo) and not st
                    for m, p, st in zip(prior_measured, sets["prior"], prior_styled)]
        return {"fidelity_in": _mean(s >= styles.STYLED_THRESHOLD for s in style_in),
                "fidelity_out": _mean(has), "adherence": _mean(asked),
                "joint_out": _mean(h and w for h, w in zip(has, whole)), "leak": _mean(leak),
                "prior": _mean(prior_ok), "prior_leak": _mean(prior_styled),
                "content_in": _mean(_content_right(m, p.combo) for m, p in zip(content_in, sets["in"])),
                "style_score_out": float(np.mean(style_out)) if style_out else 0.0}


class SubjectTask:
    name = "subject"
    subject_shape = "star"
    colour = "yellow"
    backgrounds: tuple[str, ...] = ("purple",)  # the instance images' contexts
    instance_count = 5
    data_seed = 123

    def prompt(self, combo: toy_world.Combo) -> str:
        colour, _, background = combo
        return f"a {colour} {TOKEN} on a {background} background"

    def instance_combos(self) -> list[toy_world.Combo]:
        return [(self.colour, self.subject_shape, b) for b in self.backgrounds]

    def is_training_context(self, m: Measurement) -> bool:
        """The measured image shows the instance images' colour or a background of theirs (a leak when not asked)."""
        return m.colour == self.colour or m.background in self.backgrounds

    def training_scenes(self) -> list[toy_world.Scene]:
        return toy_world.sample_scenes(self.data_seed, self.instance_count, self.instance_combos())

    def training_images(self) -> tuple[np.ndarray, list[str]]:
        scenes = self.training_scenes()
        return toy_world.render_many(scenes), [self.prompt((s.colour, s.shape, s.background)) for s in scenes]

    def out_combos(self) -> list[toy_world.Combo]:
        return [(c, self.subject_shape, b) for c in toy_world.COLOURS for b in toy_world.COLOURS
                if c != b and c != self.colour and b not in self.backgrounds]

    def prompt_sets(self, n_in: int, n_out: int, n_prior: int) -> dict[str, list[Prompted]]:
        combos = self.instance_combos()
        return {"in": [Prompted(self.prompt(combos[i % len(combos)]), combos[i % len(combos)]) for i in range(n_in)],
                "out": [Prompted(self.prompt(c), c) for c in _pick(self.out_combos(), n_out, PROMPT_SEED)],
                "prior": prior_prompts(n_prior)}

    def score(self, sets: dict[str, list[Prompted]], images: dict[str, np.ndarray], classifier) -> dict[str, float]:
        measured = {name: measure(images[name], classifier) for name in ("in", "out", "prior")}
        has = [m.shape == self.subject_shape for m in measured["out"]]
        asked = [_content_right(m, p.combo, shape_counts=False) for m, p in zip(measured["out"], sets["out"])]
        leak = [self.is_training_context(m) for m in measured["out"]]
        prior_star = [m.shape == self.subject_shape for m in measured["prior"]]
        return {"fidelity_in": _mean(m.shape == self.subject_shape for m in measured["in"]),
                "fidelity_out": _mean(has), "adherence": _mean(asked),
                "joint_out": _mean(h and a for h, a in zip(has, asked)), "leak": _mean(leak),
                "prior": _mean(_content_right(m, p.combo) for m, p in zip(measured["prior"], sets["prior"])),
                "prior_leak": _mean(prior_star)}


class SubjectInContextsTask(SubjectTask):
    """The same star in several contexts: a fixed number of images per background (drawn in order)."""

    name = "subject_contexts"
    backgrounds = ("purple", "white", "blue")
    images_per_background = 4

    def training_scenes(self) -> list[toy_world.Scene]:
        rng = np.random.default_rng(self.data_seed)
        return [toy_world.sample_scene(rng, [combo]) for combo in self.instance_combos()
                for _ in range(self.images_per_background)]


TASKS = {"style": StyleTask, "subject": SubjectTask, "subject_contexts": SubjectInContextsTask}


def get_task(name: str):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]()


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else 0.0


def write_training_folder(task, folder: Path) -> Path:
    """The task's training images as PNGs, each with its caption in a .txt beside it (written atomically)."""
    from PIL import Image

    images, captions = task.training_images()
    with atomic_directory(Path(folder)) as tmp:
        for i, (image, text) in enumerate(zip(images, captions)):
            Image.fromarray(image).save(tmp / f"{task.name}_{i:02d}.png")
            (tmp / f"{task.name}_{i:02d}.txt").write_text(text)
    return Path(folder)
