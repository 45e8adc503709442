"""How often Flat-LoRA draws each layer's noise per optimizer step (issue 13, finding 5).

    python -m benchmarks.flat_draws [--model tiny] [--resolution 64] [--train-text-encoder]

For gradient accumulation 1 and 4, gradient checkpointing off and on, with and without the
per-step noise buffer: full-size noise draws per perturbed layer per optimizer step of the
trainer's own step (`training.optimizer_step` on a Run from `training.setup`), averaged over the
perturbed layers (a layer whose input needs no gradient draws nothing in backward), and the
most any layer drew. The reference code draws 2 (it adds the noise in place once, and subtracts
it once); the buffer's floor is 1. Counts, not timings: any machine gives the same table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

from .flat_vs_lora import MODELS, PRECISIONS, Variants, make_run

SETTINGS = [(accumulation, checkpointing) for accumulation in (1, 4) for checkpointing in (False, True)]


def draws_of(args: argparse.Namespace, accumulation: int, checkpointing: bool, steps: int) -> dict[str, tuple]:
    run_args = argparse.Namespace(**{**vars(args), "accumulation": accumulation,
                                     "gradient_checkpointing": checkpointing, "sigma": 0.1, "batch": 1, "rank": 4})
    result = {}
    with tempfile.TemporaryDirectory(prefix="flatlora-draws-") as tmp:
        variants = Variants(make_run(run_args, Path(tmp)), ["flat", "flat_buffer"])
        for name in ("flat", "flat_buffer"):
            for _ in range(steps):
                variants.step(name)
            flat = variants.flats[name]
            perturbed = set(flat.layer_names)
            per_layer = [n / steps for layer, n in flat.draw_counts().items() if layer in perturbed]
            result[name] = (sum(per_layer) / len(per_layer), max(per_layer), len(per_layer))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="no")
    parser.add_argument("--train-text-encoder", action="store_true")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' checkpointing rename
    print(f"# model {args.model}, {args.resolution} px, text encoders trained {args.train_text_encoder}, "
          f"{args.steps} optimizer steps per setting")
    print(f"{'accumulation':>12} {'checkpointing':>13} {'layers':>6} {'no buffer: mean':>16} {'max':>5} "
          f"{'buffer: mean':>13} {'max':>5}")
    for accumulation, checkpointing in SETTINGS:
        draws = draws_of(args, accumulation, checkpointing, args.steps)
        (mean, most, layers), (mean_b, most_b, _) = draws["flat"], draws["flat_buffer"]
        print(f"{accumulation:>12} {str(checkpointing):>13} {layers:>6} {mean:>16.2f} {most:>5.0f} "
              f"{mean_b:>13.2f} {most_b:>5.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
