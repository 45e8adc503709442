"""Prior preservation: generate the missing class images with the base model before training."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from flatlora_diffusion.atomic import atomic_file

from .examples import derived_seed
from .images import IMAGE_EXTENSIONS


def existing_class_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def generate_class_images(pipe, folder: Path, prompt: str, wanted: int, batch_size: int, resolution: int,
                          seed: int, steps: int = 25, rank: int = 0, world_size: int = 1,
                          have: int | None = None) -> int:
    """Fill `folder` up to `wanted` images; returns how many this process wrote.

    Image k is drawn with seed derived from (seed, k), so the set does not depend on the number
    of processes; under N processes, process r draws k = r, r + N, ... `have`: the number of
    images already there, counted by every process before any of them writes (a count taken
    while another process writes would shift the split and leave holes); default: count now.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if have is None:
        have = len(existing_class_images(folder))
    todo = [k for k in range(have, wanted) if k % world_size == rank]
    if not todo:
        return 0
    pipe.set_progress_bar_config(disable=True)
    written = 0
    for start in tqdm(range(0, len(todo), batch_size), desc="generating class images", disable=rank != 0):
        chunk = todo[start:start + batch_size]
        generators = [torch.Generator(pipe.unet.device).manual_seed(derived_seed("class", seed, k)) for k in chunk]
        with torch.no_grad():
            images = pipe([prompt] * len(chunk), generator=generators, num_inference_steps=steps,
                          height=resolution, width=resolution).images
        for k, image in zip(chunk, images):
            with atomic_file(folder / f"class_{k:05d}.png") as tmp:
                image.save(tmp, format="PNG")
            written += 1
    return written
