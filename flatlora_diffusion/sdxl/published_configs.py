"""The real SDXL base 1.0 architecture as config dicts, and empty (meta-device) models built from it.

Used where we need SDXL's module names and shapes without its weights: the converter names
kohya keys and checks shapes against them, and the tests count LoRA modules on the real layout.
The values are those of stabilityai/stable-diffusion-xl-base-1.0 (unet/, text_encoder/,
text_encoder_2/ config.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SDXL_UNET_CONFIG: dict = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)

# CLIP ViT-L/14 text tower ("text_encoder", kohya lora_te1).
SDXL_TEXT_ENCODER_CONFIG: dict = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)

# OpenCLIP ViT-bigG/14 text tower with projection ("text_encoder_2", kohya lora_te2).
SDXL_TEXT_ENCODER_2_CONFIG: dict = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)


class BaseModelError(ValueError):
    """A base-model folder whose configs cannot be read."""


def load_unet_config(base: str | Path | None = None) -> dict:
    """The UNet config of the diffusers folder `base` (its unet/config.json), or real SDXL's."""
    if base is None:
        return dict(SDXL_UNET_CONFIG)
    return _read_config(Path(base) / "unet" / "config.json")


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise BaseModelError(f"{path}: no such config file (is the base a diffusers SDXL folder?)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BaseModelError(f"{path}: unreadable config ({error})") from None


def meta_sdxl_models(base: str | Path | None = None) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(unet, text_encoder, text_encoder_2) on the meta device: names and shapes, no memory.

    From the diffusers folder `base` when given, otherwise from the real SDXL configs above.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_config = load_unet_config(base)
    te_configs = (SDXL_TEXT_ENCODER_CONFIG, SDXL_TEXT_ENCODER_2_CONFIG)
    if base is not None:
        te_configs = tuple(_read_config(Path(base) / name / "config.json")
                           for name in ("text_encoder", "text_encoder_2"))
    unet_kwargs = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_kwargs)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(te_configs[0]))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(te_configs[1]))
    return unet, text_encoder, text_encoder_2
