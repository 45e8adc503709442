"""Generate the held-out combinations with a pipeline and measure what it drew.

    python -m flatlora_diffusion.toyworld.evaluate_world [--model FOLDER] [--grid grid.png]

Every held-out (colour, shape, background) is prompted once, and world_metrics measures each
image's shape colour, background colour and shape against the prompt. The default settings
(Euler, 25 steps, guidance 4) are the ones the feasibility notes report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from . import toy_world
from .world_metrics import Measurement, load_shape_classifier, measure

STEPS = 25
GUIDANCE = 4.0


def generate(pipe, prompts: list[str], seed: int = 0, steps: int = STEPS, guidance: float = GUIDANCE,
             batch: int = 64) -> np.ndarray:
    """uint8 images [n, 64, 64, 3], one per prompt, from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(prompts), batch):
        result = pipe(prompts[start:start + batch], num_inference_steps=steps, guidance_scale=guidance,
                      generator=g, output_type="np")
        out.append(np.rint(np.clip(result.images, 0, 1) * 255).astype(np.uint8))
    return np.concatenate(out)


def score(combos: list[toy_world.Combo], measured: list[Measurement]) -> dict:
    """Accuracy of colour, background, shape and all three, over matching (combo, measurement) pairs."""
    hits = {"colour": [], "background": [], "shape": [], "all": []}
    for (colour, shape, background), m in zip(combos, measured):
        ok = (m.colour == colour, m.background == background, m.shape == shape)
        for key, value in zip(("colour", "background", "shape"), ok):
            hits[key].append(value)
        hits["all"].append(all(ok))
    return {key: float(np.mean(values)) for key, values in hits.items()}


def evaluate(pipe, combos: list[toy_world.Combo] | None = None, seed: int = 0, steps: int = STEPS,
             guidance: float = GUIDANCE) -> tuple[dict, np.ndarray, list[Measurement]]:
    """(accuracies, images, measurements) on `combos` (default: the held-out combinations)."""
    combos = toy_world.held_out_combos() if combos is None else combos
    images = generate(pipe, [toy_world.caption(*combo) for combo in combos], seed, steps, guidance)
    measured = measure(images, load_shape_classifier())
    return score(combos, measured), images, measured


def save_grid(images: np.ndarray, path: str | Path, columns: int = 8) -> None:
    from PIL import Image

    n, h, w, _ = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * h, columns * w, 3), 255, np.uint8)
    for i, image in enumerate(images):
        grid[(i // columns) * h:(i // columns + 1) * h, (i % columns) * w:(i % columns + 1) * w] = image
    Image.fromarray(grid).save(path)


def main(argv: list[str] | None = None) -> int:
    from diffusers import StableDiffusionXLPipeline

    from .pretrain import WORLD_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=WORLD_MODEL_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    parser.add_argument("--grid", type=Path, default=None, help="also save the images as a PNG grid")
    args = parser.parse_args(argv)
    if not (args.model / "model_index.json").is_file():
        print(f"error: {args.model} is not a diffusers folder (no model_index.json)", file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    pipe = StableDiffusionXLPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    accuracies, images, measured = evaluate(pipe, seed=args.seed, steps=args.steps, guidance=args.guidance)
    if args.grid:
        save_grid(images, args.grid)
    misses = [f"{toy_world.caption(*c)} -> {m}" for c, m in zip(toy_world.held_out_combos(), measured)
              if (m.colour, m.shape, m.background) != c]
    print("\n".join(misses))
    print(json.dumps({"held_out_combinations": len(measured), **accuracies}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
