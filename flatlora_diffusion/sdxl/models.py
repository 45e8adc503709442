"""Loading an SDXL checkpoint (local diffusers folder or hub id) with clear errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from flatlora_diffusion.errors import UserError

REQUIRED_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


@dataclass
class SDXLParts:
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    source: str
    # the pipeline's unconditional input: zeros (SDXL base's default) or the encoded empty prompt
    force_zeros_for_empty_prompt: bool = True

    @property
    def text_encoders(self):
        return [self.text_encoder, self.text_encoder_2]

    @property
    def tokenizers(self):
        return [self.tokenizer, self.tokenizer_2]


def shareable_model_name(name_or_path: str) -> str:
    """What a LoRA file or model card may say about its base: the hub id, or a local folder's name.

    Never a local path: it would travel inside every shared file and tells nothing to anyone else.
    """
    local = Path(name_or_path).expanduser()
    return local.resolve().name if local.exists() else name_or_path


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def check_local_sdxl(folder: Path) -> None:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise UserError(f"{folder} is not a diffusers model folder (no model_index.json)")
    index = json.loads(index_file.read_text())
    missing = [part for part in REQUIRED_PARTS if part not in index]
    if missing:
        raise UserError(f"{folder} is not an SDXL model ({index.get('_class_name')}; missing {', '.join(missing)})")
    unet_config = folder / "unet" / "config.json"
    if unet_config.is_file() and json.loads(unet_config.read_text()).get("addition_embed_type") != "text_time":
        raise UserError(f"{folder} is not an SDXL model: its UNet has no text_time conditioning")


def load_sdxl(name_or_path: str, vae_name_or_path: str | None = None) -> SDXLParts:
    """Load the SDXL parts training needs; a wrong path or a non-SDXL model raises UserError."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        check_local_sdxl(path)
        source = str(path)
    elif _looks_like_hub_id(name_or_path):
        source = name_or_path
    else:
        raise UserError(f"model folder not found: {name_or_path}")
    try:
        parts = _load_parts(source, vae_name_or_path)
    except (OSError, ValueError, EnvironmentError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load model {name_or_path}: {first_line}") from None
    if parts.unet.config.addition_embed_type != "text_time":
        raise UserError(f"{name_or_path} is not an SDXL model: its UNet has no text_time conditioning")
    parts.force_zeros_for_empty_prompt = _force_zeros_for_empty_prompt(source)
    return parts


def _force_zeros_for_empty_prompt(source: str) -> bool:
    """model_index.json's flag (StableDiffusionXLPipeline's default True when absent or unreadable)."""
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(source)
    except (OSError, ValueError):
        return True
    return bool(index.get("force_zeros_for_empty_prompt", True))


def _load_parts(source: str, vae_source: str | None) -> SDXLParts:
    vae = (AutoencoderKL.from_pretrained(vae_source) if vae_source
           else AutoencoderKL.from_pretrained(source, subfolder="vae"))
    parts = SDXLParts(
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2"),
        text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2"),
        vae=vae,
        unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet"),
        noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler"),
        source=source,
    )
    for model in (parts.vae, parts.unet, parts.text_encoder, parts.text_encoder_2):
        model.requires_grad_(False)
        model.eval()
    return parts


def freeze_precision(parts: SDXLParts, dtype: torch.dtype, vae_is_fp16_safe: bool) -> None:
    """Frozen weights in the training precision; the stock SDXL VAE stays fp32 (fp16 NaNs)."""
    vae_dtype = dtype if vae_is_fp16_safe else torch.float32
    for model, wanted in ((parts.unet, dtype), (parts.text_encoder, dtype), (parts.text_encoder_2, dtype),
                          (parts.vae, vae_dtype)):
        if model.dtype != wanted:
            model.to(dtype=wanted)
