"""The state of one training run, shared by its set-up, its loop and its outputs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from flatlora_diffusion.data.batches import BatchMaker
from flatlora_diffusion.data.class_pools import ClassStreams
from flatlora_diffusion.flat.flat_lora import FlatLora
from flatlora_diffusion.sdxl.default_model import ensure_default_model
from flatlora_diffusion.sdxl.models import SDXLParts

from .config import TrainConfig
from .ema import Ema
from .nonfinite import NonfiniteGuard
from .perturbation import NoPerturbation
from .validation_loss import ValidationLoss

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Run:
    config: TrainConfig
    accelerator: Accelerator
    parts: SDXLParts
    trained: dict[str, torch.nn.Module]
    flat: FlatLora | NoPerturbation
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    batches: BatchMaker
    instances: object  # SquareStream or BucketStream
    classes: ClassStreams | None
    total_steps: int
    subsets: list = field(default_factory=list)  # the resolved data/dataset_config.Subset list
    start_step: int = 0
    ema: Ema | None = None
    validation: ValidationLoss | None = None  # --validation_loss_every, main process only
    guard: NonfiniteGuard | None = None  # skipped non-finite steps (set in setup)
    started_at: float = field(default_factory=time.time)  # Unix time, for ss_training_started_at

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)


def resolve_model_path(config: TrainConfig) -> str:
    if config.pretrained_model_name_or_path:
        return config.pretrained_model_name_or_path
    return str(ensure_default_model())


def unwrapped(run: Run) -> dict[str, torch.nn.Module]:
    return {name: run.accelerator.unwrap_model(model) for name, model in run.trained.items()}
