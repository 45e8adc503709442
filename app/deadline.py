"""How long a generation may take before the app cancels it: far more than a base image takes.

A LoRA file with extreme weights, or a pipeline stuck on bad values, must not hold the app (one
generation at a time) indefinitely. The app measures its base generations and allows FACTOR
times that, never less than FLOOR_S; before anything was measured, UNMEASURED_S.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

FACTOR = 20.0
FLOOR_S = 30.0
UNMEASURED_S = 600.0


def _work(settings) -> float:
    """Denoising work of a generation: steps x pixels (what its time grows with)."""
    return settings.steps * settings.width * settings.height


class GenerationClock:
    """The time limit of the next generation, from the last measured base generation."""

    def __init__(self, factor: float = FACTOR, floor_s: float = FLOOR_S, unmeasured_s: float = UNMEASURED_S):
        self.factor, self.floor_s, self.unmeasured_s = factor, floor_s, unmeasured_s
        self.seconds_per_work: float | None = None

    def limit_s(self, settings) -> float:
        if self.seconds_per_work is None:
            return self.unmeasured_s
        return max(self.floor_s, self.factor * self.seconds_per_work * _work(settings))

    @contextlib.contextmanager
    def measuring(self, settings) -> Iterator[None]:
        """Time the block (a base generation with `settings`); a failed block measures nothing."""
        started = time.monotonic()
        yield
        self.seconds_per_work = (time.monotonic() - started) / _work(settings)
