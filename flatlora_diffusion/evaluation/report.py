"""Write a sweep's report: REPORT.md, results.json, the curve and trade-off plots and a samples image.

The folder (docs/eval/ by default) is rewritten as a whole by every sweep; docs/EVALUATION.md is
written by hand and reads it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from flatlora_diffusion.atomic import atomic_file

from . import stats

# (key, label, which way is better)
METRICS = (
    ("fidelity_in", "in-domain fidelity (concept on trained combinations)", "higher"),
    ("fidelity_out", "out-of-domain fidelity (concept on held-out combinations)", "higher"),
    ("adherence", "prompt adherence (asked colour and background, held-out)", "higher"),
    ("joint_out", "concept and whole asked content (held-out)", "higher"),
    ("leak", "leakage of the training colours (held-out)", "lower"),
    ("prior", "prior preservation (no trigger: right and no concept)", "higher"),
    ("prior_leak", "concept shown without the trigger", "lower"),
    ("loss", "training-image denoising loss (fixed noise)", "lower"),
)
SHARES = tuple(key for key, _, _ in METRICS if key != "loss")  # shares of prompts (the rest: losses)
# the comparisons tabled in full (results.json has every one)
HEADLINE = ("fidelity_in", "fidelity_out", "adherence", "joint_out", "prior", "prior_leak", "sharpness_0.1")


def metric_rows(results: dict) -> list[tuple[str, str, str]]:
    rhos = results["run"]["sizes"]["rhos"]
    return list(METRICS) + [(f"sharpness_{rho:g}", f"sharpness, rho = {rho:g} (loss increase)", "lower")
                            for rho in rhos]


def _sigma_label(sigma: float) -> str:
    return "LoRA (σ=0)" if sigma == 0 else f"Flat-LoRA σ={sigma:g}"


def means_table(results: dict) -> str:
    """One row per (metric, steps); one column per sigma: mean ± sd over seeds."""
    rows, sigmas = results["rows"], results["sigmas"]
    lines = ["| metric | steps | " + " | ".join(_sigma_label(s) for s in sigmas) + " |",
             "|" + "---|" * (2 + len(sigmas))]
    for key, label, better in metric_rows(results):
        for steps in results["lengths"]:
            cells = []
            for s in sigmas:
                c = stats.cell_summary(rows, key, s, steps)
                fmt = ".3f" if key in SHARES else ".3g"
                cells.append("–" if c["n"] == 0 else f"{c['mean']:{fmt}} ± {c['sd']:.2g}")
            lines.append(f"| {label} ({better}) | {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparisons_table(comparisons: list[dict], keys=HEADLINE) -> str:
    lines = ["| metric | σ | steps | n | Δ vs σ=0 [95 % CI] | d_z | p | p (Holm) |", "|" + "---|" * 8]
    for c in comparisons:
        if c["metric"] not in keys:
            continue
        fmt = "+.3f" if c["metric"] in SHARES else "+.2e"  # losses and sharpness are small numbers
        lines.append(f"| {c['metric']} | {c['sigma']:g} | {c['steps']} | {c['n']} | {c['diff']:{fmt}} "
                     f"[{c['ci_low']:{fmt}}, {c['ci_high']:{fmt}}] | {c['dz']:.2f} | {_p(c['p'])} "
                     f"| {_p(c['p_holm'])} |")
    return "\n".join(lines)


def _p(p: float) -> str:
    return "n/a" if math.isnan(p) else f"{p:.3f}"


def findings(results: dict, comparisons: list[dict]) -> list[str]:
    better = {key: b for key, _, b in metric_rows(results)}
    lines = []
    for c in comparisons:
        if not math.isnan(c["p_holm"]) and c["p_holm"] < 0.05:
            good = (c["diff"] > 0) == (better[c["metric"]] == "higher")
            lines.append(f"- σ={c['sigma']:g}, {c['steps']} steps: {c['metric']} {c['diff']:+.3f} "
                         f"({'better' if good else 'worse'}; p={c['p']:.4f}, Holm {c['p_holm']:.3f})")
    return lines or [f"- none of the {len(comparisons)} comparisons with plain LoRA reaches Holm-corrected p < 0.05."]


# ---------------------------------------------------------------- figures

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve_mean(rows: list[dict], key: str, sigma: float, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    cells = [stats.cell_summary(rows, key, sigma, steps) for steps in lengths]
    return np.asarray([c["mean"] for c in cells]), np.asarray([c["sd"] / math.sqrt(max(c["n"], 1)) for c in cells])


def plot_curves(results: dict, path: Path) -> None:
    """Each metric against training steps (log axis), one line per sigma: mean ± standard error over seeds."""
    plt = _pyplot()
    keys = metric_rows(results)
    columns = 4
    fig, axes = plt.subplots(-(-len(keys) // columns), columns, figsize=(15, 3.3 * -(-len(keys) // columns)),
                             squeeze=False)
    for ax, (key, label, better) in zip(axes.ravel(), keys):
        for sigma in results["sigmas"]:
            mean, se = curve_mean(results["rows"], key, sigma, results["lengths"])
            ax.errorbar(results["lengths"], mean, yerr=se, marker="o", capsize=2, label=_sigma_label(sigma))
        if key in results.get("base", {}):
            ax.axhline(results["base"][key], color="gray", linestyle=":", label="base model")
        ax.set_xscale("log")
        ax.set_xticks(results["lengths"], [str(n) for n in results["lengths"]])
        ax.minorticks_off()
        ax.set_title(f"{label}\n({better} is better)", fontsize=8)
        ax.set_xlabel("training steps")
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)


TRADEOFFS = (("adherence", "prompt adherence (asked colour and background)"),
             ("prior", "prior preservation (no trigger: right, no style)"))


def plot_tradeoff(results: dict, path: Path, x_key: str = "fidelity_out") -> None:
    """Adherence and prior preservation against out-of-domain fidelity, one line per sigma through its lengths.

    A curve above plain LoRA's gives more of the other good at equal fidelity; one that only lags
    along the same curve is merely training slower.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(TRADEOFFS), figsize=(11, 4.5))
    for ax, (y_key, y_label) in zip(axes, TRADEOFFS):
        for sigma in results["sigmas"]:
            x, _ = curve_mean(results["rows"], x_key, sigma, results["lengths"])
            y, _ = curve_mean(results["rows"], y_key, sigma, results["lengths"])
            ax.plot(x, y, marker="o", label=_sigma_label(sigma))
            for xi, yi, steps in zip(x, y, results["lengths"]):
                ax.annotate(str(steps), (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("out-of-domain fidelity (style shown; labels: steps)")
        ax.set_ylabel(y_label)
        ax.set_title(f"{y_key} vs fidelity along training (mean over seeds)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)


def plot_samples(samples: dict[str, np.ndarray], prompts: list[str], path: Path, columns: int = 8) -> None:
    """Rows: base model, then (sigma, steps) of seed 0 (shortest, middle, longest); columns: held-out prompts."""
    plt = _pyplot()
    rows = list(samples)
    columns = min(columns, len(prompts))
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.3 * columns + 1.2, 1.35 * len(rows) + 0.5), squeeze=False)
    for r, name in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.imshow(samples[name][c], interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(prompts[c].replace(" on a ", "\non a ").replace(" background ", " bg\n"), fontsize=5)
            if c == 0:
                ax.set_ylabel(name, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


# ---------------------------------------------------------------- the files

def render_markdown(results: dict, comparisons: list[dict]) -> str:
    run = results["run"]
    quick = "\n> **Quick (CI) run: a handful of steps and prompts; these numbers mean nothing.**\n" if results.get(
        "quick") else ""
    return f"""# Sweep report: {run['task']} task, Flat-LoRA against plain LoRA along training
{quick}
Written by `python -m flatlora_diffusion.evaluation.dreambooth` from `results.json` (raw rows).
Model `{run['model']}`; recipe: {run['recipe_text']}. Sigmas {', '.join(f'{s:g}' for s in results['sigmas'])};
seeds {', '.join(map(str, results['seeds']))}; {results['minutes']:.1f} min on {run['threads']} thread(s) per
process, torch {run['torch']}, code at commit `{run.get('commit', 'unknown')}`.
Prompts per point: {run['sizes']['prompts_in']} in-domain, {run['sizes']['prompts_out']} held-out,
{run['sizes']['prompts_prior']} without the trigger;
Euler {run['sizes']['inference_steps']} steps, guidance 4, generator seed = run seed.

## Paired comparisons with plain LoRA (same seed, same steps)

Holm-corrected over all {len(comparisons)} comparisons (every metric × σ × length):

{chr(10).join(findings(results, comparisons))}

{comparisons_table(comparisons)}

## Means over seeds

{means_table(results)}

![curves](curves.png)

![trade-off](tradeoff.png)

![samples](samples.png)
"""


def write_results(results: dict, out: Path) -> list[dict]:
    """results.json (raw rows, the run's description and every comparison), atomically; returns the comparisons."""
    keys = [key for key, _, _ in metric_rows(results)]
    comparisons = stats.compare_all(results["rows"], keys, results["sigmas"], results["lengths"])
    Path(out).mkdir(parents=True, exist_ok=True)
    with atomic_file(Path(out) / "results.json") as tmp:
        tmp.write_text(json.dumps({**results, "comparisons": comparisons}, indent=1, allow_nan=True))
    return comparisons


def write_report(results: dict, samples: dict, out: Path) -> Path:
    """Write REPORT.md, results.json, curves.png, tradeoff.png and samples.png into `out`, each atomically."""
    out = Path(out)
    comparisons = write_results(results, out)
    for name, plot in (("curves.png", plot_curves), ("tradeoff.png", plot_tradeoff)):
        with atomic_file(out / name) as tmp:
            plot(results, tmp)
    if samples:
        lengths = results["lengths"]
        shown = {f" {n} st" for n in (lengths[0], lengths[len(lengths) // 2], lengths[-1])}  # keep the image readable
        rows = {name: images for name, images in samples.items()
                if name == "base model" or any(name.endswith(tail) for tail in shown)}
        with atomic_file(out / "samples.png") as tmp:
            plot_samples(rows, results["prompts_out"], tmp)
    with atomic_file(out / "REPORT.md") as tmp:
        tmp.write_text(render_markdown(results, comparisons))
    return out / "REPORT.md"
