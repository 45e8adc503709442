"""Paired comparisons of a sweep: effect sizes with confidence intervals, and Holm-corrected p-values.

Every Flat-LoRA cell (sigma > 0, steps) is compared with plain LoRA (sigma = 0) at the same steps,
seed by seed: runs with one seed share data order, diffusion noise and generation seeds, so the
per-seed difference removes that part of the spread. For each comparison:

- effect = mean paired difference, its 95 % confidence interval from the t distribution (n - 1
  degrees of freedom), and Cohen's d_z (mean difference / sd of the differences);
- p = two-sided paired t-test; then Holm's step-down correction over the whole family of
  comparisons the report makes (every metric x sigma x length), which controls the family-wise
  error rate at 5 % without assuming independence.
"""

from __future__ import annotations

import math

import numpy as np


def paired_values(rows: list[dict], key: str, sigma: float, steps: int, ref_sigma: float = 0.0):
    """(x, ref) over the seeds both cells have, in seed order."""
    def by_seed(s):
        return {r["seed"]: r[key] for r in rows if r["sigma"] == s and r["steps"] == steps and key in r}
    x, ref = by_seed(sigma), by_seed(ref_sigma)
    seeds = sorted(set(x) & set(ref))
    return np.asarray([x[s] for s in seeds], np.float64), np.asarray([ref[s] for s in seeds], np.float64)


def paired_t(diff: np.ndarray) -> tuple[float, float]:
    """(t, two-sided p) of the paired differences; nan with fewer than two pairs.

    Differences without spread make t infinite (or 0/0); then the two-sided exact sign test is what
    is left to say: all n in one direction has p = 2 * 0.5^n (0.25 for 3 seeds), not 0.
    """
    from scipy import stats

    n = len(diff)
    if n < 2:
        return math.nan, math.nan
    sd = float(diff.std(ddof=1))
    mean = float(diff.mean())
    if sd <= 1e-12 * max(1.0, abs(mean)):  # identical (or constantly shifted) pairs: t is 0 or infinite
        return (0.0, 1.0) if abs(mean) <= 1e-12 else (math.copysign(math.inf, mean), min(1.0, 2 * 0.5 ** n))
    t = mean / (sd / math.sqrt(n))
    return t, float(2 * stats.t.sf(abs(t), n - 1))


def effect(x: np.ndarray, ref: np.ndarray, level: float = 0.95) -> dict:
    """Mean paired difference x - ref, its confidence interval, Cohen's d_z, t and p."""
    from scipy import stats

    diff = x - ref
    n = len(diff)
    mean = float(diff.mean()) if n else math.nan
    t, p = paired_t(diff)
    if n >= 2:
        sd = float(diff.std(ddof=1))
        half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
        dz = mean / sd if sd > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    else:
        half, dz = math.nan, math.nan
    return {"n": n, "diff": mean, "ci_low": mean - half, "ci_high": mean + half, "dz": dz, "t": t, "p": p}


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order; nan stays nan and is not counted.

    Sorted ascending p_(1) <= ... <= p_(m): adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
    """
    finite = [(p, i) for i, p in enumerate(pvalues) if not math.isnan(p)]
    finite.sort()
    m = len(finite)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def cell_summary(rows: list[dict], key: str, sigma: float, steps: int) -> dict:
    """Mean and sd over seeds of one (sigma, steps) cell."""
    x = np.asarray([r[key] for r in rows if r["sigma"] == sigma and r["steps"] == steps and key in r], np.float64)
    return {"n": len(x), "mean": float(x.mean()) if len(x) else math.nan,
            "sd": float(x.std(ddof=1)) if len(x) > 1 else 0.0}


def compare_all(rows: list[dict], keys: list[str], sigmas: list[float], lengths: list[int]) -> list[dict]:
    """Every (metric, sigma > 0, steps) against sigma = 0, with Holm-adjusted p over the whole list."""
    out = []
    for key in keys:
        for sigma in sigmas:
            if sigma == 0:
                continue
            for steps in lengths:
                x, ref = paired_values(rows, key, sigma, steps)
                if len(x):
                    out.append({"metric": key, "sigma": sigma, "steps": steps, **effect(x, ref)})
    for comparison, adjusted in zip(out, holm([c["p"] for c in out])):
        comparison["p_holm"] = adjusted
    return out
