"""`make demo`: the main job end to end on the embedded default model, on a CPU, in minutes.

1. build the default tiny SDXL model (once), 2. make instance photos from scikit-image's bundled
CC0 cat photo, 3. train a short Flat-LoRA with train_dreambooth_flat.py, 4. reload the exported
file into a fresh diffusers pipeline and draw base vs LoRA with the same seeds.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image

from .cli import run_training
from .default_model import DEFAULT_MODEL_DIR, ensure_default_model
from .validation import side_by_side

DEMO_DATA = Path("demo_data/instance")
PROMPT = "a photo of sks cat"


def make_instance_images(folder: Path = DEMO_DATA) -> Path:
    """Four views of the same cat (crops and a flip of skimage.data.chelsea)."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    cat = Image.fromarray(data.chelsea())  # 451 x 300
    views = [cat, cat.crop((40, 0, 340, 300)), cat.crop((100, 20, 380, 300)),
             cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    for i, view in enumerate(views):
        view.save(folder / f"cat_{i}.png")
    return folder


def compare_in_fresh_pipeline(model_dir: Path, run_dir: Path, seeds=(0, 1, 2, 3)) -> Path:
    """Load the LoRA the way a user would (diffusers' load_lora_weights) and draw both rows."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=20, guidance_scale=5.0)
    gens = lambda: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    base = pipe([PROMPT] * len(seeds), generator=gens(), **kwargs).images
    pipe.load_lora_weights(run_dir)
    lora = pipe([PROMPT] * len(seeds), generator=gens(), **kwargs).images
    path = run_dir / "demo_base_vs_lora.png"
    side_by_side([base, lora]).save(path)
    return path


def main() -> int:
    started = time.time()
    model_dir = ensure_default_model(DEFAULT_MODEL_DIR)
    instance_dir = make_instance_images()
    run_dir = Path("outputs") / time.strftime("demo-%Y%m%d-%H%M%S")
    code = run_training([
        "--pretrained_model_name_or_path", str(model_dir), "--instance_data_dir", str(instance_dir),
        "--instance_prompt", PROMPT, "--output_dir", str(run_dir), "--resolution", "64", "--center_crop",
        "--random_flip", "--max_train_steps", "150", "--learning_rate", "1e-3", "--rank", "8",
        "--lora_alpha", "8", "--flat_sigma", "0.1", "--checkpointing_steps", "75",
        "--validation_prompt", PROMPT, "--validation_steps", "75", "--num_validation_images", "4",
        "--validation_inference_steps", "20"])
    if code != 0:
        return code
    comparison = compare_in_fresh_pipeline(model_dir, run_dir)
    print(f"\nmodel:        {model_dir}/ (StableDiffusionXLPipeline.from_pretrained loads it)")
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
