"""`make demo`: the main job end to end on the embedded default model, on a CPU, in minutes.

1. take the default model (the committed tiny SDXL pretrained on the shapes world), 2. draw a
new subject it has never seen (a yellow star, a shape absent from pretraining) as 5 instance
images, 3. train a short Flat-LoRA with train_dreambooth_flat.py binding it to "sks", 4. reload
the exported file into a fresh diffusers pipeline and draw base vs LoRA with the same seeds, on
the training background and on backgrounds the subject was never shown on.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image

from flatlora_diffusion.toyworld import toy_world

from .sdxl.default_model import ensure_default_model
from .sdxl.sampling import side_by_side
from .training.cli import run_training

DEMO_DATA = Path("demo_data/instance")
PROMPT = "a sks shape on a blue background"
NEW_PROMPTS = ("a sks shape on a white background", "a sks shape on a black background")
SUBJECT = dict(shape="star", colour="yellow", background="blue")


def make_instance_images(folder: Path = DEMO_DATA) -> Path:
    """Five views of the subject: a yellow star on blue, at different sizes and places."""
    folder.mkdir(parents=True, exist_ok=True)
    views = [(32, 32, 20), (24, 28, 14), (40, 36, 16), (30, 40, 12), (36, 26, 18)]
    for i, (cx, cy, half_width) in enumerate(views):
        scene = toy_world.Scene(cx=cx, cy=cy, half_width=half_width, **SUBJECT)
        Image.fromarray(toy_world.render(scene)).save(folder / f"subject_{i}.png")
    return folder


def draw(pipe, prompts: list[str], seed: int = 0) -> list[Image.Image]:
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, generator=generators, num_inference_steps=25, guidance_scale=4.0).images


def compare_in_fresh_pipeline(model_dir: Path, run_dir: Path) -> Path:
    """Load the LoRA the way a user would (diffusers' load_lora_weights) and draw both rows:
    columns 1-2 the training prompt, 3-4 the subject on backgrounds it was never shown on."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    prompts = [PROMPT, PROMPT, *NEW_PROMPTS]
    base = draw(pipe, prompts)
    pipe.load_lora_weights(run_dir)
    lora = draw(pipe, prompts)
    path = run_dir / "demo_base_vs_lora.png"
    side_by_side([base, lora]).save(path)
    return path


def main() -> int:
    started = time.time()
    model_dir = ensure_default_model()
    instance_dir = make_instance_images()
    run_dir = Path("outputs") / time.strftime("demo-%Y%m%d-%H%M%S")
    code = run_training([
        "--pretrained_model_name_or_path", str(model_dir), "--instance_data_dir", str(instance_dir),
        "--instance_prompt", PROMPT, "--output_dir", str(run_dir), "--resolution", "64", "--center_crop",
        "--train_text_encoder", "--max_train_steps", "200", "--learning_rate", "1e-3", "--rank", "8",
        "--lora_alpha", "8", "--flat_sigma", "0.1", "--checkpointing_steps", "100", "--train_batch_size", "4",
        "--validation_prompt", PROMPT, "--validation_prompt", NEW_PROMPTS[0], "--validation_steps", "100",
        "--num_validation_images", "4", "--validation_inference_steps", "25", "--validation_guidance_scale", "4"])
    if code != 0:
        return code
    comparison = compare_in_fresh_pipeline(model_dir, run_dir)
    print(f"\nmodel:        {model_dir}/ (StableDiffusionXLPipeline.from_pretrained loads it)")
    print(f"subject:      {SUBJECT['colour']} {SUBJECT['shape']} (a shape the model never saw), prompt {PROMPT!r}")
    print(f"instances:    {instance_dir}/")
    print(f"LoRA files:   {run_dir}/pytorch_lora_weights.safetensors (diffusers), "
          f"pytorch_lora_weights_kohya.safetensors (ComfyUI/A1111)")
    print(f"samples:      {run_dir}/samples/ (top row base, bottom row LoRA)")
    print(f"reloaded:     {comparison} (fresh pipeline + load_lora_weights)")
    print(f"metrics:      {run_dir}/metrics.jsonl; model card {run_dir}/README.md")
    print(f"took {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
