"""The three benchmark models, built in memory from config dicts (random weights, no download).

tiny: the embedded default model (flatlora_diffusion.sdxl.default_model), what the tests train.
mid:  SDXL's layout at about half width (block_out_channels 160/320/640, transformer layers
      1/2/4, text encoders 512 and 768 wide): every layer type of SDXL at a CPU-friendly cost.
sdxl: stabilityai/stable-diffusion-xl-base-1.0's published UNet, text-encoder and VAE configs
      (flatlora_diffusion.sdxl.published_configs + the VAE below), so every layer has its real cost.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from flatlora_diffusion.sdxl import default_model
from flatlora_diffusion.sdxl.models import SDXLParts
from flatlora_diffusion.sdxl.published_configs import (
    SDXL_TEXT_ENCODER_2_CONFIG,
    SDXL_TEXT_ENCODER_CONFIG,
    SDXL_UNET_CONFIG,
)
from flatlora_diffusion.sdxl.tokenizer import save_tokenizer_files, vocab_size

MODELS = ("tiny", "mid", "sdxl")

# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json
SDXL_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=1024,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.13025, force_upcast=True,
)

MID_UNET_CONFIG = dict(
    SDXL_UNET_CONFIG, block_out_channels=(160, 320, 640), transformer_layers_per_block=(1, 2, 4),
    attention_head_dim=(5, 10, 20), cross_attention_dim=512 + 768,
    projection_class_embeddings_input_dim=768 + 6 * 256,
)
MID_TEXT_ENCODER_CONFIG = dict(SDXL_TEXT_ENCODER_CONFIG, hidden_size=512, intermediate_size=2048,
                               num_hidden_layers=6, num_attention_heads=8, projection_dim=512)
MID_TEXT_ENCODER_2_CONFIG = dict(SDXL_TEXT_ENCODER_2_CONFIG, hidden_size=768, intermediate_size=3072,
                                 num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
MID_VAE_CONFIG = dict(SDXL_VAE_CONFIG, block_out_channels=(32, 64, 128, 128), layers_per_block=1)


def _configs(name: str) -> tuple[dict, dict, dict, dict, int]:
    """(unet, text_encoder, text_encoder_2, vae, max_tokens) configs of model `name`."""
    if name == "tiny":
        te1, te2 = (default_model.text_encoder_config(p).to_dict() for p in (False, True))
        return default_model.unet_config(), te1, te2, default_model.vae_config(), default_model.MAX_TOKENS
    if name == "mid":
        return MID_UNET_CONFIG, MID_TEXT_ENCODER_CONFIG, MID_TEXT_ENCODER_2_CONFIG, MID_VAE_CONFIG, 77
    if name == "sdxl":
        return SDXL_UNET_CONFIG, SDXL_TEXT_ENCODER_CONFIG, SDXL_TEXT_ENCODER_2_CONFIG, SDXL_VAE_CONFIG, 77
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Build parameters directly in `dtype`: no fp32 copy of SDXL is ever held (it would set the
    process's peak RSS before the first step and hide the training peak)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_parts(name: str, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> SDXLParts:
    """SDXLParts as `flatlora_diffusion.sdxl.models.load_sdxl` returns them, frozen, in eval mode.

    UNet and text encoders in `dtype` (the training precision), the VAE in fp32 as
    `freeze_precision` keeps the stock SDXL VAE.
    """
    unet_cfg, te1_cfg, te2_cfg, vae_cfg, max_tokens = _configs(name)
    te1_cfg = dict(te1_cfg, vocab_size=max(te1_cfg.get("vocab_size", 0), vocab_size()))
    te2_cfg = dict(te2_cfg, vocab_size=max(te2_cfg.get("vocab_size", 0), vocab_size()))
    tokenizer_dir = Path(tempfile.mkdtemp(prefix="bench-tokenizer-"))
    save_tokenizer_files(tokenizer_dir, max_length=max_tokens)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    with warnings.catch_warnings(), torch.device(device):
        warnings.simplefilter("ignore")
        with _default_dtype(dtype):
            unet = UNet2DConditionModel(**unet_cfg)
            text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(te1_cfg))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(te2_cfg))
        vae = AutoencoderKL(**vae_cfg)
    parts = SDXLParts(tokenizer, tokenizer, text_encoder, text_encoder_2, vae, unet,
                      DDPMScheduler(**default_model.scheduler_config()), source=f"benchmark:{name}")
    for model in (parts.vae, parts.unet, parts.text_encoder, parts.text_encoder_2):
        model.requires_grad_(False)
        model.eval()
    return parts


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
