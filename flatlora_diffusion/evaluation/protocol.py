"""One curve of the benchmark: train a LoRA through several lengths, evaluate it at each.

A (task, sigma, seed) run trains with the project's own training script to the first length, saves
the LoRA, then resumes to the next length, and so on. The default recipe keeps the learning rate and
the Flat-LoRA sigma constant (`--lr_scheduler constant --flat_schedule constant`), and a resume is
bit-exact, so the LoRA at each length *is* the LoRA a run of that length gives: one run per curve,
not one per point. The paper's cosine sigma ramp depends on the run's length, so with
`flat_schedule="cosine"` every length of a sigma > 0 curve is its own run from scratch (sigma 0 is
plain LoRA whatever the schedule, and stays one resumed run)."""

from __future__ import annotations

import contextlib
import io
import math
import shutil
import time
from dataclasses import asdict, dataclass
from functools import reduce
from pathlib import Path

import numpy as np
import torch

from flatlora_diffusion.toyworld.evaluate_world import generate

from . import tasks
from .sharpness import sharpness


@dataclass(frozen=True)
class Recipe:
    """The training flags every run of a sweep shares (only --flat_sigma and --seed change)."""

    lengths: tuple[int, ...] = (100, 200, 400, 800)
    learning_rate: float = 1e-3
    text_encoder_lr: float = 1e-3
    rank: int = 8
    alpha: float = 4.0
    batch: int = 4
    train_text_encoder: bool = True
    snr_gamma: float = 5.0  # the world model was pretrained with Min-SNR 5 and noise offset 0.1
    noise_offset: float = 0.1
    flat_schedule: str = "constant"  # or "cosine", the paper's ramp (one run per length)

    def __post_init__(self):
        if self.flat_schedule not in ("constant", "cosine"):
            raise ValueError(f"Recipe.flat_schedule must be constant or cosine, got {self.flat_schedule!r}")
        if not self.lengths or list(self.lengths) != sorted(set(self.lengths)) or self.lengths[0] < 1:
            raise ValueError(f"Recipe.lengths must be increasing positive step counts, got {self.lengths}")
        for name in ("learning_rate", "text_encoder_lr", "alpha"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Recipe.{name} must be > 0, got {getattr(self, name)}")
        for name in ("rank", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"Recipe.{name} must be >= 1, got {getattr(self, name)}")

    def describe(self) -> str:
        encoders = f", text encoders at lr {self.text_encoder_lr:g}" if self.train_text_encoder else ", UNet only"
        return (f"LoRA rank {self.rank} alpha {self.alpha:g}, AdamW lr {self.learning_rate:g} constant{encoders}, "
                f"batch {self.batch}, Min-SNR {self.snr_gamma:g}, noise offset {self.noise_offset:g}, "
                f"{self.schedule_text()}; lengths {', '.join(map(str, self.lengths))} steps")

    def schedule_text(self) -> str:
        if self.flat_schedule == "cosine":
            return "cosine Flat-LoRA sigma ramp (the paper's; one run per length)"
        return "constant Flat-LoRA sigma"

    def resumes(self, sigma: float) -> bool:
        """Whether a curve is one run resumed from length to length (else one run per length)."""
        return self.flat_schedule == "constant" or sigma == 0


@dataclass(frozen=True)
class Sizes:
    """How much is generated and measured at each point of a curve."""

    prompts_in: int = 12
    prompts_out: int = 24
    prompts_prior: int = 12
    inference_steps: int = 20
    rhos: tuple[float, ...] = (0.05, 0.1, 0.2)
    draws: int = 2

    def __post_init__(self):
        for name in ("prompts_in", "prompts_out", "prompts_prior", "inference_steps", "draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"Sizes.{name} must be >= 1, got {getattr(self, name)}")


# The recipe per task, chosen by the pilot (evaluation/pilot.py; docs/EVALUATION.md has its table).
RECIPES = {
    # 25 steps under-fits, 50 learns the style in domain, 400 transfers it (and damages the prior), 800 over-fits
    "style": Recipe(lengths=(25, 50, 100, 200, 400, 800), learning_rate=3e-3, text_encoder_lr=3e-3),
    "subject": Recipe(rank=4, alpha=4.0, learning_rate=3e-3, text_encoder_lr=3e-3),
}
QUICK_RECIPE = Recipe(lengths=(2, 4), rank=2, alpha=1.0)
QUICK_SIZES = Sizes(prompts_in=2, prompts_out=2, prompts_prior=2, inference_steps=2, rhos=(0.1,), draws=1)


def training_args(model_dir: Path, data_dir: Path, out: Path, recipe: Recipe, sigma: float, seed: int,
                  steps: int, instance_prompt: str) -> list[str]:
    """Flags of train_dreambooth_flat.py for one stage of a curve (resuming from the previous one)."""
    resume = recipe.resumes(sigma)
    every = reduce(math.gcd, recipe.lengths) if resume else steps
    args = ["--pretrained_model_name_or_path", str(model_dir), "--instance_data_dir", str(data_dir),
            "--instance_prompt", instance_prompt, "--resolution", "64", "--output_dir", str(out),
            "--max_train_steps", str(steps), "--train_batch_size", str(recipe.batch),
            "--rank", str(recipe.rank), "--lora_alpha", str(recipe.alpha),
            "--learning_rate", str(recipe.learning_rate), "--lr_scheduler", "constant",
            "--snr_gamma", str(recipe.snr_gamma), "--noise_offset", str(recipe.noise_offset),
            "--flat_sigma", str(sigma), "--flat_schedule", recipe.flat_schedule, "--seed", str(seed),
            "--checkpointing_steps", str(every), "--checkpoints_total_limit", "1",
            "--validation_inference_steps", "2", "--num_validation_images", "1"]
    if recipe.train_text_encoder:
        args += ["--train_text_encoder", "--text_encoder_lr", str(recipe.text_encoder_lr)]
    if resume and steps != recipe.lengths[0]:
        args += ["--resume_from_checkpoint", "latest"]
    return args


def train_stage(args: list[str], out: Path, steps: int) -> Path:
    """Run one stage in-process (its output goes to out/train.log); returns a copy of its LoRA file."""
    from flatlora_diffusion.training.cli import run_training

    out.mkdir(parents=True, exist_ok=True)
    log = io.StringIO()
    with contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
        code = run_training(args)
    with (out / "train.log").open("a") as f:
        f.write(log.getvalue())
    if code != 0:
        raise RuntimeError(f"training to {steps} steps failed (exit {code}); see {out / 'train.log'}")
    lora = out / f"lora_{steps}.safetensors"
    shutil.copyfile(out / "pytorch_lora_weights.safetensors", lora)
    return lora


def load_pipe(model_dir: Path, lora: Path | None = None):
    """A fresh pipeline, with `lora` attached when given (fresh, so no adapter of another run lingers)."""
    from diffusers import StableDiffusionXLPipeline

    from flatlora_diffusion.lora.load import load_lora_into_pipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        load_lora_into_pipeline(pipe, lora)
    return pipe


def prompt_sets(task, sizes: Sizes) -> dict[str, list[tasks.Prompted]]:
    return task.prompt_sets(sizes.prompts_in, sizes.prompts_out, sizes.prompts_prior)


def evaluate(model_dir: Path, lora: Path | None, task, sizes: Sizes, classifier, gen_seed: int,
             with_sharpness: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """(metrics, images per prompt set) of one LoRA (or of the base model when `lora` is None)."""
    pipe = load_pipe(model_dir, lora)
    sets = prompt_sets(task, sizes)
    prompts = [p.prompt for name in ("in", "out", "prior") for p in sets[name]]
    drawn = generate(pipe, prompts, seed=gen_seed, steps=sizes.inference_steps)
    images, start = {}, 0
    for name in ("in", "out", "prior"):
        images[name], start = drawn[start:start + len(sets[name])], start + len(sets[name])
    metrics = task.score(sets, images, classifier)
    if lora is not None and with_sharpness:
        metrics.update(sharpness(pipe, task, sizes.rhos, sizes.draws))
    return metrics, images


def run_curve(model_dir: Path, data_dir: Path, work: Path, task, recipe: Recipe, sizes: Sizes, sigma: float,
              seed: int, classifier, on_point=None, done: tuple[int, ...] = ()) -> list[dict]:
    """Train (task, sigma, seed) through every length; one result row per length.

    `on_point(row, images)` is called after each length (progress, samples). `done`: lengths
    already scored (rows elsewhere); the curve then resumes from its last checkpoint in `work`.
    """
    out = work / f"{task.name}_sigma{sigma:g}_seed{seed}"
    if out.exists() and not done:
        shutil.rmtree(out)  # a stale run would be resumed from its last checkpoint
    instance_prompt = task.training_images()[1][0]
    rows, trained_s = [], 0.0
    for steps in (n for n in recipe.lengths if n not in done):
        if not recipe.resumes(sigma) and out.exists():
            shutil.rmtree(out)  # a run of its own length, from scratch
        t0 = time.time()
        lora = train_stage(training_args(model_dir, data_dir, out, recipe, sigma, seed, steps, instance_prompt),
                           out, steps)
        trained_s += time.time() - t0
        t1 = time.time()
        metrics, images = evaluate(model_dir, lora, task, sizes, classifier, gen_seed=seed)
        row = {"task": task.name, "sigma": sigma, "seed": seed, "steps": steps, "train_s": trained_s,
               "eval_s": time.time() - t1, **metrics}
        rows.append(row)
        if on_point is not None:
            on_point(row, images)
    return rows


def describe_run(task, recipe: Recipe, sizes: Sizes, model_dir: Path) -> dict:
    return {"task": task.name, "model": str(model_dir), "recipe": asdict(recipe), "sizes": asdict(sizes),
            "recipe_text": recipe.describe(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "commit": code_commit()}


def code_commit(here: Path | None = None) -> str:
    """The git commit of the code that ran (with "+changes" when its code was edited), or "unknown".

    Only the package and the training script count: a sweep rewriting docs/eval is not a code change.
    """
    import subprocess

    here = here or Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ":/flatlora_diffusion", ":/train_dreambooth_flat.py"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")

