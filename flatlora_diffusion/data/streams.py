"""Which examples each micro-batch trains on: square crops or aspect-ratio buckets.

A stream maps a global batch number (optimizer step × accumulation × processes + rank) to
[(example index, epoch, (height, width))], as a pure function of (seed, batch number): resume and
sharding across processes need no state.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .buckets import epoch_batches, make_buckets, nearest_bucket
from .examples import Example, derived_seed, epoch_order


class Draw(NamedTuple):
    index: int
    epoch: int
    size: tuple[int, int]  # (height, width) to train this image at


def repeated_indices(examples: list[Example], repeats: int = 1) -> list[int]:
    """Each example index `repeats x example.repeats` times, round by round: with equal repeats r
    this is range(n) * r, so one subset orders its samples as before subsets existed."""
    counts = [repeats * e.repeats for e in examples]
    return [i for r in range(max(counts)) for i, c in enumerate(counts) if c > r]


class SquareStream:
    """Every image at resolution x resolution; each epoch a fresh permutation (x its repeats)."""

    def __init__(self, examples: list[Example], seed: int, resolution: int, repeats: int = 1):
        self.examples, self.seed, self.resolution = examples, seed, resolution
        self.positions = repeated_indices(examples, repeats)

    def samples_per_epoch(self, batch_size: int) -> int:
        return len(self.positions)

    def draw(self, batch_number: int, batch_size: int) -> list[Draw]:
        return [self._at(batch_number * batch_size + j) for j in range(batch_size)]

    def draw_like(self, batch_number: int, like: list[Draw]) -> list[Draw]:
        """Class images for an instance batch: same count, same size."""
        return self.draw(batch_number, len(like))

    def _at(self, position: int) -> Draw:
        n = len(self.positions)
        epoch, offset = divmod(position, n)
        index = self.positions[int(epoch_order(n, self.seed, epoch)[offset])]
        return Draw(index, epoch, (self.resolution, self.resolution))


class BucketStream:
    """Images in aspect-ratio buckets of about resolution^2 pixels; each batch from one bucket."""

    def __init__(self, examples: list[Example], seed: int, resolution: int, repeats: int = 1):
        self.examples, self.seed = examples, seed
        buckets = make_buckets(resolution)
        self.bucket_of = [nearest_bucket(*e.size, buckets) for e in examples]
        self.positions = repeated_indices(examples, repeats)
        self.repeated = [self.bucket_of[i] for i in self.positions]  # the bucket of every sample of an epoch

    def samples_per_epoch(self, batch_size: int) -> int:
        """Batches per epoch x batch size (a bucket's last batch may be short)."""
        return self._batches_per_epoch(batch_size) * batch_size

    def _batches_per_epoch(self, batch_size: int) -> int:
        counts = {b: self.repeated.count(b) for b in set(self.repeated)}
        return sum(math.ceil(c / batch_size) for c in counts.values())

    def draw(self, batch_number: int, batch_size: int) -> list[Draw]:
        epoch, k = divmod(batch_number, self._batches_per_epoch(batch_size))
        batch = epoch_batches(self.repeated, batch_size, self.seed, epoch)[k]
        return [Draw(self.positions[i], epoch, self.repeated[i]) for i in batch]

    def draw_like(self, batch_number: int, like: list[Draw]) -> list[Draw]:
        """Class images of the instance batch's bucket (any class image, cropped to it, if none is)."""
        size = like[0].size
        pool = [i for i, b in zip(self.positions, self.repeated) if b == size] or self.positions
        draws = []
        for j in range(len(like)):
            position = batch_number * len(like) + j
            epoch, offset = divmod(position, len(pool))
            order = epoch_order(len(pool), derived_seed(self.seed, size), epoch)
            draws.append(Draw(pool[int(order[offset])], epoch, size))
        return draws


def make_stream(examples: list[Example], seed: int, resolution: int, repeats: int, buckets: bool):
    kind = BucketStream if buckets else SquareStream
    return kind(examples, seed, resolution, repeats)
