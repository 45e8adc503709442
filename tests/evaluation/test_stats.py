"""Paired effect sizes, confidence intervals and Holm's correction."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from flatlora_diffusion.evaluation import stats


def test_holm_by_hand():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> raised to 0.06 (monotone)
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, math.nan, 0.6]) == pytest.approx([1.0, math.nan, 1.0], nan_ok=True)
    assert stats.holm([]) == []


def test_effect_matches_scipy_and_its_interval():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=6)
    x = ref + 0.5 + rng.normal(scale=0.3, size=6)
    e = stats.effect(x, ref)
    assert e["p"] == pytest.approx(scipy_stats.ttest_rel(x, ref).pvalue)
    diff = x - ref
    half = scipy_stats.t.ppf(0.975, 5) * diff.std(ddof=1) / math.sqrt(6)
    assert (e["ci_low"], e["ci_high"]) == pytest.approx((diff.mean() - half, diff.mean() + half))
    assert e["dz"] == pytest.approx(diff.mean() / diff.std(ddof=1)) and e["n"] == 6


def test_degenerate_pairs():
    same = np.array([0.2, 0.4, 0.6])
    assert stats.effect(same, same)["p"] == 1.0
    assert stats.effect(same + 0.1, same)["p"] == pytest.approx(0.25)  # 3 of 3 up: the sign test, not p = 0
    assert math.isnan(stats.effect(np.array([1.0]), np.array([0.0]))["p"])


def _rows():
    rows = []
    for seed in range(5):
        for steps in (10, 20):
            rows.append({"sigma": 0.0, "seed": seed, "steps": steps, "m": 0.1 * seed})
            rows.append({"sigma": 0.1, "seed": seed, "steps": steps, "m": 0.1 * seed + (0.3 if steps == 20 else 0.0)
                         + 0.01 * (seed % 2)})
    return rows


def test_compare_all_pairs_by_seed_and_step():
    comparisons = stats.compare_all(_rows(), ["m"], [0.0, 0.1], [10, 20])
    assert [(c["sigma"], c["steps"]) for c in comparisons] == [(0.1, 10), (0.1, 20)]
    late = comparisons[1]
    assert late["diff"] == pytest.approx(0.304) and late["p_holm"] < 0.001 and late["p_holm"] >= late["p"]
    assert stats.cell_summary(_rows(), "m", 0.0, 10)["mean"] == pytest.approx(0.2)
