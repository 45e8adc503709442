"""Run a training phase for a fixed number of steps, or for as many as fit in a time budget.

A budget makes a run fit a shared CPU whose speed changes as other jobs come and go, so the
step count is not fixed from an early probe: the loop watches the clock and commits to a total
once `commit_tenths` tenths of the budget have passed (10: stop right there; 7: stop at the step
that makes the steps so far 70 % of the total, leaving 30 % for an LR decay). The count it ran is
returned and recorded, so the run can be repeated with `steps=` and no clock involved.
"""

from __future__ import annotations

import time
from typing import Callable


def total_from_commit(step: int, commit_tenths: int) -> int:
    """The total whose first `commit_tenths`/10 is exactly `step` steps (see `decays`)."""
    return (step * 10) // commit_tenths


def in_final_part(step: int, total: int | None, commit_tenths: int) -> bool:
    """True for the steps after the commit point, the same set whether the total came from a clock or a flag.

    With total = (k * 10) // c this is exactly step >= k, because 10 k - 10 < c * total <= 10 k.
    """
    return total is not None and step * 10 >= commit_tenths * total


def run_steps(step: Callable[[int, int | None], float], name: str, steps: int | None = None,
              budget_s: float | None = None, commit_tenths: int = 10, max_steps: int = 100_000,
              log_every: int = 25, log: Callable[[str], None] = print) -> tuple[int, float]:
    """Call `step(i, total)` (it returns the loss) and return (steps run, seconds).

    With `steps` given, exactly that many, and `step` sees the total from the start. With
    `budget_s`, `step` sees total=None until the commit point, then the committed total.
    """
    if (steps is None) == (budget_s is None):
        raise ValueError(f"{name}: give exactly one of steps and budget_s")
    if not 1 <= commit_tenths <= 10:
        raise ValueError(f"{name}: commit_tenths must be in 1..10, got {commit_tenths}")
    start, total, i, smooth = time.perf_counter(), steps, 0, None
    while total is None or i < total:
        loss = step(i, total)
        i += 1
        smooth = loss if smooth is None else 0.95 * smooth + 0.05 * loss
        elapsed = time.perf_counter() - start
        if total is None and (elapsed >= commit_tenths / 10 * budget_s
                              or total_from_commit(i, commit_tenths) >= max_steps):
            total = min(max_steps, max(i, total_from_commit(i, commit_tenths)))
            log(f"[{name}] {elapsed / i:.2f} s/step so far -> committing to {total} steps")
        if i % log_every == 0 or i == total:
            eta = elapsed / i * (total - i) if total else budget_s * commit_tenths / 10 - elapsed
            log(f"[{name}] step {i}/{total or '?'}  loss {smooth:.4f}  {elapsed / 60:.1f} min, "
                f"{'eta' if total else 'commit in'} {eta / 60:.1f} min")
    return i, time.perf_counter() - start
