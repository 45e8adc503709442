"""Checks that run before anything is loaded or written: a bad run stops in a second, with one line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from flatlora_diffusion.data.images import list_images
from flatlora_diffusion.data.latent_cache import check_cache_folder
from flatlora_diffusion.errors import UserError

from .config import TrainConfig
from .optimizers import check_optimizer_available


def preflight(config: TrainConfig) -> None:
    check_output_dir(config)
    check_optimizer_available(config)
    check_tracker_available(config)
    if config.validation_data_dir:  # missing or image-less held-out folder: before the model loads
        list_images(config.validation_data_dir, "validation")
    if config.cache_latents_to_disk:
        check_cache_folder(config.cache_latents_to_disk)


# What the app's Train tab (app/launcher.py) puts in a run folder before starting the trainer
# in it: the config it wrote, the log it redirects to, the pid file and the uploaded images.
LAUNCH_FILES = frozenset({"run.toml", "train.log", "train.pid", "instance_images"})


def check_output_dir(config: TrainConfig) -> None:
    """Refuse to mix two runs in one folder; resuming needs the folder's own checkpoints."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} exists and is not a folder")
    others = out.is_dir() and any(p.name not in LAUNCH_FILES for p in out.iterdir())
    if config.resume_from_checkpoint is None and others:
        raise UserError(f"--output_dir {out} already holds files of another run; choose a new folder "
                        "or pass --resume_from_checkpoint latest")


TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                    "comet_ml": ("comet_ml",), "aim": ("aim",), "clearml": ("clearml",), "dvclive": ("dvclive",)}


def check_tracker_available(config: TrainConfig) -> None:
    """accelerate only warns and logs nothing when a tracker is missing; we refuse at start."""
    if config.report_to is None:
        return
    packages = TRACKER_PACKAGES.get(config.report_to)
    if packages is None:
        raise UserError(f"--report_to {config.report_to}: unknown tracker (one of {', '.join(TRACKER_PACKAGES)})")
    if not any(importlib.util.find_spec(p) for p in packages):
        raise UserError(f"--report_to {config.report_to} needs the '{packages[0]}' package (pip install {packages[0]})")
