"""The pilot: which recipe lets plain LoRA learn a task? (issue 15, before any sigma is compared)

    python -m flatlora_diffusion.evaluation.pilot [--task style] [--recipes NAME ...] [--seeds 1]
                                                  [--model PATH] [--out docs/pilot_results.json]

Each named recipe trains plain LoRA (sigma = 0) through its lengths (one resumed run per seed,
evaluated at each length) and the JSON collects every point; `--quick` is the CI size. The target
(issue 15): instance/in-domain fidelity >= 0.9 and out-of-domain fidelity >= 0.5.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from flatlora_diffusion.atomic import atomic_file

from . import protocol, tasks

TARGET_IN, TARGET_OUT = 0.9, 0.5
BASE = protocol.Recipe()
PILOT_RECIPES = {
    "r8-lr1e-3-te": BASE,
    "r8-lr3e-3-te": replace(BASE, learning_rate=3e-3, text_encoder_lr=3e-3, lengths=(50, 100, 200, 400)),
    "r8-lr1e-3-unet": replace(BASE, train_text_encoder=False),
    "r16-lr3e-4-te": replace(BASE, rank=16, alpha=8.0, learning_rate=3e-4, text_encoder_lr=3e-4,
                             lengths=(200, 400, 800, 1600)),
    "r4-lr3e-3-te-old": replace(BASE, rank=4, alpha=4.0, learning_rate=3e-3, text_encoder_lr=3e-3,
                                lengths=(100, 200, 400, 800)),
}


def reaches_target(row: dict) -> bool:
    return row["fidelity_in"] >= TARGET_IN and row["fidelity_out"] >= TARGET_OUT


def run_pilot(model_dir: Path, work: Path, task, recipes: dict[str, protocol.Recipe], seeds: list[int],
              sizes: protocol.Sizes, progress=print) -> list[dict]:
    from flatlora_diffusion.toyworld.world_metrics import load_shape_classifier

    classifier = load_shape_classifier()
    data_dir = tasks.write_training_folder(task, work / f"{task.name}_data")
    rows = []
    for name, recipe in recipes.items():
        progress(f"recipe {name}: {recipe.describe()}")
        for seed in seeds:
            def show(row, _images, name=name):
                progress(f"  {name} seed {row['seed']} {row['steps']:>5} steps ({row['train_s']:.0f}s train): "
                         + ", ".join(f"{k} {row[k]:.2f}" for k in tasks.METRICS))
            for row in protocol.run_curve(model_dir, data_dir, work / name, task, recipe, sizes, 0.0, seed,
                                          classifier, on_point=show):
                rows.append({"recipe": name, "recipe_text": recipe.describe(), **row})
    return rows


def pilot_table(rows: list[dict]) -> str:
    """Markdown: one line per (recipe, length), metrics averaged over seeds; ✓ where the target is met."""
    keys = ("fidelity_in", "fidelity_out", "adherence", "joint_out", "leak", "prior", "prior_leak")
    lines = ["| recipe | steps | seeds | " + " | ".join(keys) + " | target |", "|" + "---|" * (4 + len(keys))]
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["recipe"], row["steps"]), []).append(row)
    for (name, steps), group in groups.items():
        mean = {k: sum(r[k] for r in group) / len(group) for k in keys}
        mark = "✓" if reaches_target(mean) else ""
        lines.append(f"| {name} | {steps} | {len(group)} | " + " | ".join(f"{mean[k]:.2f}" for k in keys)
                     + f" | {mark} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from flatlora_diffusion.toyworld.pretrain import WORLD_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(tasks.TASKS), default="style")
    parser.add_argument("--recipes", nargs="+", default=list(PILOT_RECIPES), choices=list(PILOT_RECIPES))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="override every recipe's lengths")
    parser.add_argument("--model", type=Path, default=WORLD_MODEL_DIR)
    parser.add_argument("--work", type=Path, default=Path("outputs/pilot"))
    parser.add_argument("--out", type=Path, default=Path("docs/pilot_results.json"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = tasks.get_task(args.task)
    started = time.time()
    recipes = {n: PILOT_RECIPES[n] for n in args.recipes}
    if args.lengths:
        try:
            recipes = {n: replace(r, lengths=tuple(args.lengths)) for n, r in recipes.items()}
        except ValueError as err:
            parser.error(str(err))
    rows = run_pilot(args.model, args.work, task, recipes,
                     list(range(args.seeds)), protocol.Sizes(), progress=lambda s: print(s, flush=True))
    previous = json.loads(args.out.read_text()) if args.out.is_file() else []
    kept = [r for r in previous if not (r["task"] == task.name and r["recipe"] in args.recipes)]
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(kept + rows, indent=1))
    print(pilot_table(rows))
    print(f"wrote {args.out} ({(time.time() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
