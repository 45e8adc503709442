"""Builders shared by the Train tab's tests: images, a short run's form, waiting on a run."""

from __future__ import annotations

import time
from pathlib import Path

from PIL import Image

from app.train_form import TrainForm

PROMPT = "a sks cat"
WAIT = 300  # seconds a run may take on a loaded 2-core machine (it takes about 15)


def png(path: Path, colour=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (72, 64), colour).save(path)
    return path


def quick_form(**overrides) -> TrainForm:
    """A short run at the embedded model's size; `overrides` replace fields."""
    values = dict(instance_prompt=PROMPT, image_folder="photos", max_train_steps=40.0, resolution=64.0, rank=4.0,
                  lora_alpha=6.0, learning_rate=1e-3, checkpointing_steps=1000.0, num_validation_images=1.0,
                  validation_inference_steps=2.0, validation_prompt="a sks cat on a sofa")
    return TrainForm(**{**values, **overrides})


def wait_for(condition, timeout: float = WAIT, what: str = "condition", every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
