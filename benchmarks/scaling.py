"""Flat-LoRA vs LoRA against LoRA rank and resolution: a table and docs/benchmark_scaling.png.

    python -m benchmarks.scaling --model mid --precision bf16 --ranks 4,16,64 --resolutions 128,256

Each point is one `benchmarks.flat_vs_lora` run (lora and flat interleaved in one process,
peak memory of each in a fresh subprocess): ranks at the first resolution, resolutions at the
first rank.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(model: str, precision: str, rank: int, resolution: int, steps: int, warmup: int,
            extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "benchmarks.flat_vs_lora", "--model", model, "--precision", precision,
                   "--rank", str(rank), "--resolution", str(resolution), "--variants", "lora,flat",
                   "--steps", str(steps), "--warmup", str(warmup), "--memory-steps", "1", "--json", str(out), *extra]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        print(done.stdout, flush=True)
        return json.loads(out.read_text())


def table(points: list[dict]) -> str:
    lines = ["| rank | resolution | LoRA s/step | Flat s/step | time ratio | LoRA peak MiB | Flat peak MiB "
             "| memory ratio |", "|---|---|---|---|---|---|---|---|"]
    for p in points:
        lora, flat = p["rows"]["lora"], p["rows"]["flat"]
        ratio = p["ratios"]["flat/lora"]
        lines.append(f"| {p['args']['rank']} | {p['args']['resolution']} | {lora['median_s']:.3f} | "
                     f"{flat['median_s']:.3f} | {ratio['time']:.3f} | {lora['peak_mib']:.0f} | "
                     f"{flat['peak_mib']:.0f} | {ratio['memory']:.4f} |")
    return "\n".join(lines)


def plot(rank_points: list[dict], res_points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for col, (points, key, label) in enumerate(((rank_points, "rank", "LoRA rank"),
                                                (res_points, "resolution", "resolution (px)"))):
        xs = [p["args"][key] for p in points]
        for variant, style in (("lora", "o-"), ("flat", "s--")):
            name = "LoRA (sigma 0)" if variant == "lora" else "Flat-LoRA"
            axes[0, col].plot(xs, [p["rows"][variant]["median_s"] for p in points], style, label=name)
            axes[1, col].plot(xs, [p["rows"][variant]["peak_mib"] for p in points], style, label=name)
        for row, ylabel in ((0, "median s / optimizer step"), (1, "peak memory (MiB)")):
            ax = axes[row, col]
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
        ratios = ", ".join(f"{x}: {p['ratios']['flat/lora']['time']:.2f}x" for x, p in zip(xs, points))
        axes[0, col].set_title(f"time ratio {ratios}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mid")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--ranks", default="4,16,64")
    parser.add_argument("--resolutions", default="128,256")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--plot", default=str(ROOT / "docs" / "benchmark_scaling.png"))
    parser.add_argument("--json", help="write all points to this JSON file")
    parser.add_argument("--mmap-threshold", type=int, help="passed to flat_vs_lora (CPU peak RSS of live memory)")
    args = parser.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    resolutions = [int(r) for r in args.resolutions.split(",")]
    cache: dict[tuple[int, int], dict] = {}

    def point(rank: int, resolution: int) -> dict:
        if (rank, resolution) not in cache:
            extra = ["--mmap-threshold", str(args.mmap_threshold)] if args.mmap_threshold else []
            cache[rank, resolution] = measure(args.model, args.precision, rank, resolution, args.steps, args.warmup,
                                              extra)
        return cache[rank, resolution]

    rank_points = [point(r, resolutions[0]) for r in ranks]
    res_points = [point(ranks[0], s) for s in resolutions]
    print(f"## against rank ({args.model}, {resolutions[0]} px, {args.precision})\n\n{table(rank_points)}\n")
    print(f"## against resolution ({args.model}, rank {ranks[0]}, {args.precision})\n\n{table(res_points)}\n")
    plot(rank_points, res_points, Path(args.plot),
         f"Flat-LoRA vs LoRA, {args.model} model, precision {args.precision}, batch 1 "
         "(machine: see the printed reports)")
    if args.json:
        Path(args.json).write_text(json.dumps(list(cache.values()), indent=2))
    print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
