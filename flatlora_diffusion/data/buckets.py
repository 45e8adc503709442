"""Aspect-ratio buckets: train on non-square images without cropping them to squares.

Buckets are (height, width) pairs, sides multiples of 64, area at most resolution^2 and as
close to it as the 64 grid allows (SDXL's own training buckets: 1024x1024, 1152x896, 1216x832,
1344x768, ... at 1024). Each image goes to the bucket nearest its aspect ratio; every batch is
drawn from one bucket, and the batch order of an epoch is a function of (seed, epoch).
"""

from __future__ import annotations

import math

import numpy as np

from .examples import derived_seed

GRID = 64


def make_buckets(resolution: int, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(height, width) buckets of about resolution^2 pixels, both orientations, sorted by aspect."""
    area = resolution * resolution
    buckets = set()
    for width in range(GRID, int(resolution * math.sqrt(max_ratio)) + GRID, GRID):
        height = (area // width) // GRID * GRID
        if height >= GRID and max(width, height) / min(width, height) <= max_ratio:
            buckets.update({(height, width), (width, height)})
    if not buckets:
        raise ValueError(f"no {GRID}-pixel-grid bucket fits resolution {resolution}")
    return sorted(buckets, key=lambda hw: hw[1] / hw[0])


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log space, so 2:1 ~ 1:2)."""
    target = math.log(width / height)
    return min(buckets, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - target), -hw[0] * hw[1]))


def epoch_batches(bucket_of: list[tuple[int, int]], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: examples shuffled within their bucket, chunked, batches shuffled.

    A bucket's last batch may be smaller than `batch_size`; no image is dropped.
    """
    rng = np.random.default_rng(derived_seed("buckets", seed, epoch))
    batches = []
    for bucket in sorted(set(bucket_of)):
        members = [i for i, b in enumerate(bucket_of) if b == bucket]
        members = [members[k] for k in rng.permutation(len(members))]
        batches += [members[k:k + batch_size] for k in range(0, len(members), batch_size)]
    return [batches[k] for k in rng.permutation(len(batches))]
