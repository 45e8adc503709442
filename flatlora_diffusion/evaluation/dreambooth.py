"""The benchmark (issue 15): Flat-LoRA against plain LoRA along the whole training curve.

    python -m flatlora_diffusion.evaluation.dreambooth [--quick] [--task style|subject] [--model PATH]
        [--seeds 5] [--sigmas 0 0.05 0.1 0.2] [--lengths 100 200 400 800] [--jobs 2] [--out docs/eval]

For every (sigma, seed) one LoRA is trained through all lengths (protocol.run_curve: resumed runs,
constant LR and sigma, so each length is exactly a run of that length) and scored at each length by
the world's ground truth (tasks.py); stats.py pairs every Flat-LoRA cell with plain LoRA by seed,
report.py writes REPORT.md, results.json, the curve, trade-off and samples images into --out.
The recipe is printed first so the protocol can be rerun on another base (`--model`, any
SDXL-shaped diffusers folder that draws the shapes world with its tokenizer).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from . import protocol, tasks

DEFAULT_SIGMAS = (0.0, 0.05, 0.1, 0.2)


def parse_args(argv: list[str] | None):
    from flatlora_diffusion.toyworld.pretrain import WORLD_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI size: 2 and 4 steps, 2 prompts per set")
    parser.add_argument("--task", choices=sorted(tasks.TASKS), default="style")
    parser.add_argument("--model", type=Path, default=WORLD_MODEL_DIR, help="SDXL diffusers folder (the base)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per sigma")
    parser.add_argument("--sigmas", type=float, nargs="+", default=list(DEFAULT_SIGMAS))
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="training steps evaluated")
    parser.add_argument("--flat_schedule", choices=("constant", "cosine"), default="constant",
                        help="Flat-LoRA sigma schedule: constant (one resumed run per curve) or the paper's cosine "
                             "ramp (one run per length for sigma > 0)")
    parser.add_argument("--jobs", type=int, default=1, help="curves trained in parallel (one process each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out", type=Path, default=Path("docs/eval"))
    parser.add_argument("--work", type=Path, default=Path("outputs/eval"), help="LoRA runs go here")
    parser.add_argument("--extend", action="store_true",
                        help="add the --lengths that --out's finished sweep lacks, resuming its runs in --work")
    parser.add_argument("--report-only", action="store_true",
                        help="redraw --out's report from its results.json (and --work's samples.npz), e.g. of a "
                             "sweep stopped early; trains nothing")
    args = parser.parse_args(argv)
    if 0.0 not in args.sigmas:
        parser.error("--sigmas must include 0 (plain LoRA, the reference of every comparison)")
    if any(s < 0 for s in args.sigmas):
        parser.error("--sigmas must be >= 0")
    for name in ("seeds", "jobs", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if not (args.model / "model_index.json").is_file():
        parser.error(f"--model {args.model} is not a diffusers folder (no model_index.json)")
    try:
        recipe, sizes = plan(args)
    except ValueError as err:
        parser.error(str(err))
    return args, recipe, sizes


def plan(args) -> tuple[protocol.Recipe, protocol.Sizes]:
    recipe = protocol.QUICK_RECIPE if args.quick else protocol.RECIPES[args.task]
    if args.lengths:
        recipe = replace(recipe, lengths=tuple(args.lengths))
    recipe = replace(recipe, flat_schedule=args.flat_schedule)
    return recipe, (protocol.QUICK_SIZES if args.quick else protocol.Sizes())


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    quiet_libraries()


def curve_job(model_dir: Path, data_dir: Path, work: Path, task_name: str, recipe: protocol.Recipe,
              sizes: protocol.Sizes, sigma: float, seed: int, done: tuple[int, ...] = ()) -> tuple[list[dict], dict]:
    """One (sigma, seed) curve in a worker; returns its rows and (seed 0 only) its held-out images."""
    from flatlora_diffusion.toyworld.world_metrics import load_shape_classifier

    task, samples = tasks.get_task(task_name), {}

    def keep(row, images):
        if seed == 0:
            samples[f"σ={sigma:g} {row['steps']} st"] = images["out"]
    rows = protocol.run_curve(model_dir, data_dir, work, task, recipe, sizes, sigma, seed, load_shape_classifier(),
                              on_point=keep, done=done)
    return rows, samples


def run_sweep(args, recipe: protocol.Recipe, sizes: protocol.Sizes, on_curve=None) -> tuple[dict, dict]:
    """Base model, then every (sigma, seed) curve; `on_curve(results, samples)` after each finished curve."""
    from tqdm import tqdm

    from flatlora_diffusion.toyworld.world_metrics import load_shape_classifier

    task = tasks.get_task(args.task)
    started = time.time()
    data_dir = args.work / f"{task.name}_data"
    if args.extend:
        results, samples = previous_sweep(args, recipe)
    else:
        tasks.write_training_folder(task, data_dir)
        base, base_images = protocol.evaluate(args.model, None, task, sizes, load_shape_classifier(), gen_seed=0)
        results = {"sigmas": sorted(args.sigmas), "seeds": list(range(args.seeds)), "base": base, "rows": [],
                   "prompts_out": [p.prompt for p in protocol.prompt_sets(task, sizes)["out"]], "quick": args.quick}
        samples = {"base model": base_images["out"]}
    results.update(run=protocol.describe_run(task, recipe, sizes, args.model), lengths=list(recipe.lengths))
    earlier = results.get("minutes", 0.0)
    jobs = [(args.model, data_dir, args.work, task.name, recipe, sizes, sigma, seed,
             tuple(r["steps"] for r in results["rows"] if r["sigma"] == sigma and r["seed"] == seed))
            for seed in results["seeds"] for sigma in results["sigmas"]]  # seed-major: a seed's pairs finish together
    jobs = [job for job in jobs if len(job[-1]) < len(recipe.lengths)]
    bar = tqdm(total=len(jobs), desc="curves (sigma x seed)", unit="curve")
    results["failed"] = []
    for job, rows, curve_samples, error in curves(jobs, args.jobs, args.threads):
        bar.update()
        if error:
            results["failed"].append({"sigma": job[6], "seed": job[7], "error": error})
            bar.write(f"curve sigma {job[6]:g} seed {job[7]} failed: {error}")
            continue
        results["rows"] += rows
        samples.update(curve_samples)
        results["minutes"] = earlier + (time.time() - started) / 60
        last = rows[-1]
        bar.set_postfix_str(f"σ={last['sigma']:g} seed {last['seed']}: fid_out {last['fidelity_out']:.2f} "
                            f"adh {last['adherence']:.2f}")
        if on_curve is not None:
            on_curve(results, samples)
            np.savez_compressed(args.work / "samples.npz", **samples)
    bar.close()
    results["rows"].sort(key=lambda r: (r["sigma"], r["seed"], r["steps"]))
    results["minutes"] = earlier + (time.time() - started) / 60
    return results, dict(sorted(samples.items(), key=_sample_order))


def previous_sweep(args, recipe: protocol.Recipe) -> tuple[dict, dict]:
    """--extend: the finished sweep in --out (results.json) and --work (runs, samples.npz) to add lengths to."""
    import json

    found = args.out / "results.json"
    if not found.is_file() or not (args.work / "samples.npz").is_file():
        _refuse(f"--extend needs {found} and {args.work / 'samples.npz'} of a finished sweep")
    results = {k: v for k, v in json.loads(found.read_text()).items() if k != "comparisons"}
    schedule = results["run"]["recipe"].get("flat_schedule", "constant")
    if schedule != recipe.flat_schedule:
        _refuse(f"--extend: the sweep in {args.out} used --flat_schedule {schedule}, not {recipe.flat_schedule}")
    if not set(results["lengths"]) < set(recipe.lengths):
        _refuse(f"--extend: --lengths must add lengths to the sweep's {results['lengths']}")
    return results, dict(np.load(args.work / "samples.npz"))


def _refuse(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def curves(jobs: list[tuple], processes: int, threads: int):
    """Yield (job, rows, samples, error) of each curve_job as it finishes, in this process or in a pool.

    In a pool a failed curve (e.g. a library reinstalled under a running sweep) is reported as its
    `error` and the sweep goes on; `--extend` reruns the curves that have no rows.
    """
    if processes == 1:
        for job in jobs:
            yield (job, *curve_job(*job), None)
        return
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(curve_job, *job): job for job in jobs}
        for future in as_completed(futures):
            try:
                yield (futures[future], *future.result(), None)
            except Exception as err:  # one curve's failure must not lose the others
                yield futures[future], [], {}, f"{type(err).__name__}: {err}"


def _sample_order(item) -> tuple:
    name = item[0]
    if name == "base model":
        return (-1.0, 0)
    sigma, steps = name.split(" ")[0][2:], name.split(" ")[1]
    return (float(sigma), int(steps))


@contextlib.contextmanager
def quiet_progress_bars():
    """Our progress bar is the one to read; the libraries' per-load bars would bury it (restored after)."""
    import diffusers
    import transformers

    quiet_libraries()
    try:
        yield
    finally:
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()


def quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def redraw_report(out: Path, work: Path) -> int:
    """Rewrite the report from results.json alone (the rows of whatever curves finished)."""
    import json

    from .report import write_report

    results_file = out / "results.json"
    if not results_file.is_file():
        print(f"error: --report-only: no {results_file}", file=sys.stderr)
        return 2
    results = {k: v for k, v in json.loads(results_file.read_text()).items() if k != "comparisons"}
    done = {r["seed"] for r in results["rows"]}
    results["seeds"] = sorted(s for s in done if all(
        any(r["seed"] == s and r["sigma"] == sigma for r in results["rows"]) for sigma in results["sigmas"]))
    results["rows"] = sorted((r for r in results["rows"] if r["seed"] in results["seeds"]),
                             key=lambda r: (r["sigma"], r["seed"], r["steps"]))
    samples = dict(np.load(work / "samples.npz")) if (work / "samples.npz").is_file() else {}
    report = write_report(results, dict(sorted(samples.items(), key=_sample_order)), out)
    print(f"wrote {report} from {len(results['rows'])} rows (complete seeds {results['seeds']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .report import write_report, write_results

    args, recipe, sizes = parse_args(argv)
    if args.report_only:
        return redraw_report(args.out, args.work)
    torch.set_num_threads(args.threads)
    print(f"benchmark: task {args.task}, model {args.model}\nrecipe: {recipe.describe()}\n"
          f"sweep: sigmas {sorted(args.sigmas)} x seeds 0..{args.seeds - 1}, {args.jobs} process(es)", flush=True)
    with quiet_progress_bars():
        results, samples = run_sweep(args, recipe, sizes, on_curve=lambda r, _s: write_results(r, args.out))
    report = write_report(results, samples, args.out)
    print(f"wrote {report} ({results['minutes']:.1f} min)")
    if results["failed"]:
        print(f"error: {len(results['failed'])} curve(s) failed (listed in results.json); "
              "rerun them with --extend", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
