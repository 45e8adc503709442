"""The model card (README.md) written beside the LoRA files."""

from __future__ import annotations

from pathlib import Path

from flatlora_diffusion.atomic import atomic_file

CARD = """---
base_model: {base}
library_name: diffusers
tags: [stable-diffusion-xl, lora, dreambooth, flat-lora, flatlora-diffusion]
instance_prompt: {prompt!r}
---

# Flat-LoRA DreamBooth LoRA for SDXL

Trained with flatlora-diffusion on `{base}`. Trigger prompt: **{prompt}**

| setting | value |
|---|---|
| rank / alpha | {rank} / {alpha} |
| conv LoRA rank / alpha (kohya LoCon layout) | {conv} |
| Flat-LoRA sigma / schedule / seed | {sigma} / {schedule} / {seed} |
| steps / learning rate / resolution | {steps} / {lr} / {resolution} |
| text encoders trained | {te} |
| prior preservation | {prior} |
| optimizer / Min-SNR gamma / noise offset | {optimizer} / {snr} / {offset} |
| EMA decay (main file = EMA weights) / aspect buckets | {ema} / {buckets} |

{samples}

## Files
- `pytorch_lora_weights.safetensors`: diffusers / PEFT format.
- `pytorch_lora_weights_kohya.safetensors`: kohya format (ComfyUI, A1111/Forge), true alpha per module.

## diffusers
```python
import torch
from diffusers import StableDiffusionXLPipeline
pipe = StableDiffusionXLPipeline.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("path/to/this/folder")
image = pipe("{prompt}").images[0]
```

## ComfyUI
Copy `pytorch_lora_weights_kohya.safetensors` to `ComfyUI/models/loras/` and add a
*Load LoRA* node (strength 1.0 is the trained strength).

## A1111 / Forge
Copy `pytorch_lora_weights_kohya.safetensors` to `models/Lora/` and write
`<lora:pytorch_lora_weights_kohya:1>` in the prompt.
"""


SAMPLES_HEADING = "## Samples (top row: base model, bottom row: with this LoRA, same seeds)\n\n"


def write_model_card(output_dir: Path, config, base: str, samples: list[Path], prompt: str | None = None) -> Path:
    """`prompt`: the trigger prompt (default --instance_prompt; with --dataset_config, the first subset's)."""
    rows = "\n".join(f"![{p.stem}](samples/{p.name})" for p in samples)
    text = CARD.format(
        base=base, prompt=prompt or config.instance_prompt or "", rank=config.rank, alpha=config.alpha,
        sigma=config.flat_sigma, schedule=config.flat_schedule, seed=config.noise_seed,
        steps=config.max_train_steps or "epochs",
        lr=config.learning_rate, resolution=config.resolution, te=config.train_text_encoder,
        prior=config.with_prior_preservation, conv=_conv_lora(config),
        optimizer="adamw-8bit" if config.use_8bit_adam else config.optimizer, snr=config.snr_gamma or "off",
        offset=config.noise_offset or "off", ema=config.ema_decay or "off", buckets=config.aspect_buckets,
        samples=(SAMPLES_HEADING + rows) if samples else "")
    path = Path(output_dir) / "README.md"
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return path


def _conv_lora(config) -> str:
    if config.conv_rank is None:
        return "off"
    return f"{config.conv_rank} / {config.conv_alpha if config.conv_alpha is not None else float(config.conv_rank)}"
