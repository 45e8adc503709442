"""Sample images during training from the components already in memory (no reload from disk).

Each prompt is drawn with fixed seeds twice, with the LoRA disabled (base) and enabled, and
saved as one side-by-side image: top row base, bottom row LoRA.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image

from flatlora_diffusion.atomic import atomic_file


def pipeline_from_parts(parts, unet, text_encoder, text_encoder_2) -> StableDiffusionXLPipeline:
    """An inference pipeline sharing the training modules (and their LoRA) by reference."""
    scheduler = EulerDiscreteScheduler.from_config(parts.noise_scheduler.config)
    pipe = StableDiffusionXLPipeline(
        vae=parts.vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=parts.tokenizer,
        tokenizer_2=parts.tokenizer_2, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def adapters_disabled(*models):
    """Temporarily run the base model: every PEFT adapter of `models` off, then back on."""
    touched = [m for m in models if _has_adapters(m)]
    for model in touched:
        model.disable_adapters()
    try:
        yield
    finally:
        for model in touched:
            model.enable_adapters()


def _has_adapters(model) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


@torch.no_grad()
def render(pipe, prompt: str, seeds: list[int], steps: int, guidance: float, size: int) -> list[Image.Image]:
    device = pipe.unet.device
    generators = [torch.Generator(device).manual_seed(s) for s in seeds]
    return pipe([prompt] * len(seeds), generator=generators, num_inference_steps=steps, guidance_scale=guidance,
                height=size, width=size).images


def side_by_side(rows: list[list[Image.Image]]) -> Image.Image:
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(map(len, rows)), h * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid.paste(img, (c * w, r * h))
    return grid


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:limit] or "prompt"


def sample_images(pipe, prompts: list[str], count: int, seed: int, steps: int, guidance: float, size: int,
                  folder: Path, tag: str) -> list[Path]:
    """Write `<folder>/<tag>_<i>_<prompt>.png`: base row over LoRA row, same seeds."""
    seeds = [seed + i for i in range(count)]
    written = []
    for i, prompt in enumerate(prompts):
        with adapters_disabled(pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
            base = render(pipe, prompt, seeds, steps, guidance, size)
        lora = render(pipe, prompt, seeds, steps, guidance, size)
        path = Path(folder) / f"{tag}_{i}_{slug(prompt)}.png"
        with atomic_file(path) as tmp:
            side_by_side([base, lora]).save(tmp, format="PNG")
        written.append(path)
    return written
