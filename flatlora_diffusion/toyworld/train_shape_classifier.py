"""Train the shape classifier of world_metrics on procedural images (~1 CPU-minute).

    python -m flatlora_diffusion.toyworld.train_shape_classifier      # writes assets/shape_classifier.safetensors

Training images are drawn with all nine shapes and all colour pairs, then blurred and noised
at random, because the images it will judge come out of a small VAE: softer edges and some
speckle. Held-out accuracy of the committed weights (seed 0, 600 steps; fresh seeds, 2,000 images
each, all nine shapes): 100.0 % on clean images and 100.0 % on blurred+noised ones (every run
prints both again).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from flatlora_diffusion.atomic import atomic_file

from . import toy_world
from .world_metrics import CLASSIFIER_PATH, ShapeClassifier, shape_view

TRAIN_IMAGES = 8_000
STEPS = 600
BATCH = 128
LR = 2e-3


def degrade(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random Gaussian blur (sigma 0-1.5 px) and pixel noise (std 0-12): what a small VAE does to edges."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        sigma = rng.uniform(0.0, 1.5)
        soft = ndimage.gaussian_filter(image.astype(np.float32), (sigma, sigma, 0))
        noisy = soft + rng.normal(0.0, rng.uniform(0.0, 12.0), soft.shape)
        out[i] = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return out


def labelled_views(seed: int, n: int, degraded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(views [n, 32, 32], labels [n]) for `n` images with every shape and colour pair."""
    images, scenes = toy_world.generate(seed, n, toy_world.all_combos(toy_world.ALL_SHAPES))
    if degraded:
        images = degrade(images, np.random.default_rng(seed + 1))
    views = torch.from_numpy(np.stack([shape_view(image) for image in images]))
    labels = torch.tensor([toy_world.ALL_SHAPES.index(s.shape) for s in scenes])
    return views, labels


def train(seed: int = 0, steps: int = STEPS, n_images: int = TRAIN_IMAGES) -> ShapeClassifier:
    views, labels = labelled_views(seed, n_images, degraded=True)
    clean_views, clean_labels = labelled_views(seed + 100, n_images // 4, degraded=False)
    views, labels = torch.cat([views, clean_views]), torch.cat([labels, clean_labels])
    with torch.random.fork_rng(devices=[]):  # seeded init, caller's RNG untouched
        torch.manual_seed(seed)
        model = ShapeClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(views), (BATCH,), generator=g)
        batch = views[idx]
        flip = torch.rand(BATCH, generator=g) < 0.5  # every world shape is left-right symmetric
        batch = torch.where(flip[:, None, None], batch.flip(-1), batch)
        loss = F.cross_entropy(model(batch), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}/{steps}  loss {loss.item():.4f}", flush=True)
    return model.eval()


@torch.no_grad()
def accuracy(model: ShapeClassifier, seed: int, n: int = 2000, degraded: bool = False) -> float:
    views, labels = labelled_views(seed, n, degraded)
    return (model(views).argmax(-1) == labels).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CLASSIFIER_PATH)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one thread: two spin-wait on each other on a shared CPU (see pretrain.main)
    model = train(args.seed)
    clean = accuracy(model, seed=10_000 + args.seed)
    degraded = accuracy(model, seed=20_000 + args.seed, degraded=True)
    print(f"held-out accuracy: clean {clean:.4f}, blurred+noised {degraded:.4f}")
    from safetensors.torch import save_file

    with atomic_file(args.out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
