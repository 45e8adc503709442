"""Write the DreamBooth evaluation's report: docs/EVALUATION.md, its plots, sample grid and raw JSON.

Statistics: for every metric, mean and standard deviation over seeds per sigma, and a paired
t-test (scipy.stats.ttest_rel) of each sigma against sigma = 0 over the same seeds. Runs with one
seed pair share data order, diffusion noise and generation seeds, so pairing removes that part of
the spread. No correction for the many tests is applied: read single p-values near 0.05 with care.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from flatlora_diffusion.atomic import atomic_file

# (key, label, which way is better)
METRICS = (
    ("subject_fidelity", "subject fidelity (held-out prompts drawn as the subject)", "higher"),
    ("prompt_fidelity", "prompt fidelity (asked colour and background)", "higher"),
    ("subject_and_prompt", "subject and prompt both right", "higher"),
    ("instance_leak", "overfitting: instance colour/background leaks", "lower"),
    ("prior_preservation", "prior preservation (class prompts fully right)", "higher"),
    ("prior_subject_leak", "class prompts drawn as the subject", "lower"),
    ("instance_fidelity", "instance prompt drawn as the subject", "higher"),
    ("loss", "instance denoising loss (fixed noise)", "lower"),
)


def metric_rows(results: dict) -> list[tuple[str, str, str]]:
    rhos = results["protocol"]["rhos"]
    return list(METRICS) + [(f"sharpness_{rho:g}", f"sharpness, rho = {rho:g} (loss increase)", "lower")
                            for rho in rhos]


def values(results: dict, key: str, sigma: float) -> np.ndarray:
    """The metric over seeds for one sigma, in seed order (so two sigmas pair by seed)."""
    runs = sorted((r for r in results["runs"] if r["sigma"] == sigma), key=lambda r: r["seed"])
    return np.asarray([r[key] for r in runs], np.float64)


def paired_p(x: np.ndarray, ref: np.ndarray) -> float:
    """Two-sided paired t-test p-value; nan with fewer than two pairs or identical pairs."""
    from scipy import stats

    if len(x) < 2:
        return math.nan
    diff = x - ref
    if np.allclose(diff, 0.0):  # identical runs: no evidence of any difference
        return 1.0
    if np.allclose(diff, diff[0]):  # constant non-zero difference: t is infinite
        return 0.0
    return float(stats.ttest_rel(x, ref).pvalue)


def summary(results: dict) -> dict:
    """{metric: {sigma: {"mean", "sd", "p", "n"}}} with p against sigma = 0."""
    out = {}
    for key, _, _ in metric_rows(results):
        ref = values(results, key, 0.0)
        out[key] = {}
        for sigma in results["sigmas"]:
            x = values(results, key, sigma)
            out[key][f"{sigma:g}"] = {"mean": float(x.mean()), "sd": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
                                      "p": math.nan if sigma == 0 else paired_p(x, ref), "n": len(x)}
    return out


def _cell(stats: dict, sigma: float, fraction: bool) -> str:
    # fractions of prompts read best with fixed decimals; losses span decades, so significant digits
    text = f"{stats['mean']:.3f} ± {stats['sd']:.3f}" if fraction else f"{stats['mean']:.3g} ± {stats['sd']:.2g}"
    if sigma != 0:
        p = stats["p"]
        text += " (p n/a)" if math.isnan(p) else f" (p={p:.3f}{'*' if p < 0.05 else ''})"
    return text


def markdown_table(results: dict, stats: dict) -> str:
    """Metric rows, one column for the base model and one per sigma (mean ± sd over seeds, paired p vs 0)."""
    sigmas = results["sigmas"]
    head = "| metric | better | base model | " + " | ".join(
        "LoRA (σ=0)" if s == 0 else f"Flat-LoRA σ={s:g}" for s in sigmas) + " |"
    lines = [head, "|" + "---|" * (3 + len(sigmas))]
    for key, label, better in metric_rows(results):
        base = results["base"].get(key)
        base_text = "–" if base is None else f"{base:.3f}"
        fraction = key not in ("loss",) and not key.startswith("sharpness")
        cells = " | ".join(_cell(stats[key][f"{s:g}"], s, fraction) for s in sigmas)
        lines.append(f"| {label} | {better} | {base_text} | {cells} |")
    return "\n".join(lines)


def findings(results: dict, stats: dict) -> list[str]:
    """One line per (metric, sigma) whose paired difference from sigma = 0 has p < 0.05."""
    lines = []
    for key, label, better in metric_rows(results):
        ref = stats[key]["0"]["mean"]
        for sigma in results["sigmas"][1:]:
            s = stats[key][f"{sigma:g}"]
            if not math.isnan(s["p"]) and s["p"] < 0.05:
                good = (s["mean"] > ref) == (better == "higher")
                lines.append(f"- σ={sigma:g}: {label}: {ref:.3f} → {s['mean']:.3f} "
                             f"({'better' if good else 'worse'}, p={s['p']:.3f})")
    return lines or ["- no difference from plain LoRA reaches p < 0.05 on any metric."]


# ---------------------------------------------------------------- figures

def plot_metrics(results: dict, path: Path) -> None:
    """Each generation metric against sigma: seeds as dots, mean ± sd as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [m for m in METRICS if m[0] != "loss"]
    fig, axes = plt.subplots(2, 4, figsize=(14, 6.5))
    sigmas = results["sigmas"]
    for ax, (key, label, better) in zip(axes.ravel(), keys):
        data = [values(results, key, s) for s in sigmas]
        for s, x in zip(sigmas, data):
            ax.scatter([s] * len(x), x, s=12, alpha=0.5, color="tab:blue")
        ax.errorbar(sigmas, [x.mean() for x in data], yerr=[x.std(ddof=1) if len(x) > 1 else 0 for x in data],
                    color="black", capsize=3, marker="o")
        ax.axhline(results["base"][key], color="tab:gray", linestyle=":", label="base model")
        ax.set_title(f"{label}\n({better} is better)", fontsize=8)
        ax.set_xlabel("flat_sigma")
        ax.set_ylim(-0.05, 1.05)
    axes.ravel()[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)


def plot_sharpness(results: dict, path: Path) -> None:
    """Expected loss increase against the perturbation radius rho, one line per sigma (mean ± sd)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rhos = results["protocol"]["rhos"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for sigma in results["sigmas"]:
        data = [values(results, f"sharpness_{rho:g}", sigma) for rho in rhos]
        ax.errorbar(rhos, [x.mean() for x in data], yerr=[x.std(ddof=1) if len(x) > 1 else 0 for x in data],
                    marker="o", capsize=3, label="LoRA" if sigma == 0 else f"Flat-LoRA σ={sigma:g}")
    ax.set_xlabel("rho (filter-wise noise radius)")
    ax.set_ylabel("E[L(W'+eps)] - L(W')  (instance images)")
    ax.set_title("full-space sharpness (lower = flatter)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)


def plot_samples(samples: dict, prompts: list[str], path: Path, columns: int = 6) -> None:
    """Rows: base model, then each sigma (seed 0); columns: the first held-out prompts, same seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(samples)
    columns = min(columns, len(prompts))
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.6 * columns + 0.8, 1.7 * len(rows) + 0.4), squeeze=False)
    for r, name in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.imshow(samples[name][c], interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(prompts[c].replace(" on a ", "\non a "), fontsize=7)
            if c == 0:
                ax.set_ylabel("base" if name == "base" else ("LoRA σ=0" if name == "0" else f"σ={name}"), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


# ---------------------------------------------------------------- the markdown document

PROTOCOL = """\
## Protocol

- **World and model.** The embedded tiny SDXL pretrained on the procedural shapes world
  (`flatlora_diffusion/assets/tiny-sdxl-world`), which never saw a star.
- **Subject.** A *star* (a shape absent from pretraining), always **yellow on purple**, bound to
  the rare token `sks`. {instance_count} instance images (64 px, varied size and position), instance prompt
  `{instance_prompt}`.
- **Training recipe** (identical for every run; only `--flat_sigma` changes): {steps} steps, batch {batch},
  AdamW, constant LR {lr:g} for the UNet and both text encoders (`--train_text_encoder`), LoRA rank {rank},
  alpha {rank}, Min-SNR 5 and noise offset 0.1 (as in pretraining), no prior preservation, cosine
  Flat-LoRA schedule. Chosen by a pilot: with UNet-only LoRA the token never turned into a star
  (0/15 held-out prompts at 400 steps, lr 1e-3 or 3e-3; lr 1e-2 destroyed the colours), while with
  the text encoders trained the instance prompt gives the star and some held-out prompts do, so
  plain LoRA learns the subject within the budget and there is room to generalise better. Prior
  preservation was left off so that drift of the prior is visible as a metric rather than trained away.
- **Held-out prompts** ({held_out}): `a {{colour}} sks on a {{background}} background` with colour ≠ yellow
  and background ≠ purple; **class prompts** ({prior}): pretraining captions without the token, e.g.
  `{prior_example}`; **instance prompt** ({instance}× generated). Euler, {inference_steps} steps, guidance 4,
  generator seed = run seed.
- **Metrics from the world's ground truth** (`world_metrics.measure`: palette colours + shape classifier,
  100 % accurate on procedural images, star included — see tests/test_world_eval.py):
  subject fidelity = held-out images classified as a star; prompt fidelity = measured shape colour and
  background both equal the prompt's; overfitting = shape colour yellow or background purple when not asked;
  prior preservation = class prompts with colour, shape and background all right; class prompts drawn
  as a star; instance fidelity = instance prompt drawn as a star.
- **Sharpness in the full weight space.** On the {instance_count} instance images × timesteps
  {timesteps}, fixed noise, unweighted epsilon MSE with the instance prompt: `L(W')`, and the mean of
  `L(W' + eps) - L(W')` over {draws} draws, eps filter-wise exactly as Flat-LoRA's (std
  `rho·||W'_i||/sqrt(n)` per output row, on every LoRA-targeted Linear of the UNet and both text
  encoders, via `FlatLora(..., schedule="constant")`), for rho in {rhos}.
- **Statistics.** {seeds} seeds per sigma (seed = data order, diffusion noise, Flat-LoRA noise and
  generation seed). Mean ± sd over seeds; p = paired t-test by seed of each sigma against σ = 0
  (`scipy.stats.ttest_rel`), `*` = p < 0.05, no multiple-test correction ({tests} tests in the table).
"""


def render_markdown(results: dict, stats: dict, quick: bool) -> str:
    p = results["protocol"]
    n_tests = len(metric_rows(results)) * (len(results["sigmas"]) - 1)
    protocol = PROTOCOL.format(
        instance_count=5, instance_prompt="a yellow sks on a purple background", steps=p["steps"], batch=p["batch"],
        lr=p["learning_rate"], rank=p["rank"], held_out=p["held_out_prompts"], prior=p["prior_prompts"],
        prior_example=results["prompts"]["prior"][0], instance=p["instance_prompts"],
        inference_steps=p["inference_steps"], timesteps="(100, 300, 500, 700, 900)", draws=p["draws"],
        rhos="{" + ", ".join(f"{r:g}" for r in p["rhos"]) + "}", seeds=len(results["seeds"]), tests=n_tests)
    stats_table = markdown_table(results, stats)
    warning = "\n> **Quick (CI) run: a handful of steps and prompts; these numbers mean nothing.**\n" if quick else ""
    return f"""# DreamBooth evaluation: does Flat-LoRA generalise better?
{warning}
Reproduce with `make eval` (`python -m flatlora_diffusion.evaluation.dreambooth`); this run took
{results['minutes']:.1f} min on {results['threads']} CPU thread(s), torch {results['torch']}. Raw numbers:
`eval_results.json`.

{protocol}
## Results

{stats_table}

Significant differences from plain LoRA (paired p < 0.05, uncorrected):

{chr(10).join(findings(results, stats))}

![metrics against sigma](eval_metrics.png)

![sharpness against rho](eval_sharpness.png)

Samples (seed 0 runs; every row uses the same generation seed and prompts; held-out colours):

![samples](eval_samples.png)
"""


def write_report(results: dict, samples: dict, out: Path) -> Path:
    """Write EVALUATION.md, eval_results.json and the three PNGs into `out`, each atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = summary(results)
    for name, plot in (("eval_metrics.png", lambda p: plot_metrics(results, p)),
                       ("eval_sharpness.png", lambda p: plot_sharpness(results, p)),
                       ("eval_samples.png", lambda p: plot_samples(samples, results["prompts"]["held_out"], p))):
        with atomic_file(out / name) as tmp:
            plot(tmp)
    with atomic_file(out / "eval_results.json") as tmp:
        tmp.write_text(json.dumps({**results, "summary": stats}, indent=1, allow_nan=True))
    return write_markdown(results, out)


def write_markdown(results: dict, out: Path) -> Path:
    """(Re)write EVALUATION.md from raw results, e.g. those of eval_results.json, without rerunning."""
    results = {key: value for key, value in results.items() if key != "summary"}
    with atomic_file(Path(out) / "EVALUATION.md") as tmp:
        tmp.write_text(render_markdown(results, summary(results), results["protocol"]["steps"] < 50))
    return Path(out) / "EVALUATION.md"
