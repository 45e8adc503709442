"""The embedded default model: a tiny SDXL-architecture pipeline.

Two forms of the same architecture:
- the pretrained one, committed at `flatlora_diffusion/assets/tiny-sdxl-world/` (trained on the
  procedural shapes world by `python -m flatlora_diffusion.toyworld.pretrain`, so prompts like "a red
  circle on a blue background" draw what they say); this is the default everywhere;
- a randomly initialised one built offline from a seed (`build_default_pipeline`), the fallback
  when the committed folder is missing and the starting point of the pretraining.

It has every part of SDXL that our code touches (two CLIP text encoders whose penultimate
hidden states are concatenated for cross-attention, a pooled projection, `text_time` added
conditioning, an AutoencoderKL and an SDXL-style scheduler), at a size that trains on a CPU.
`write_default_model(folder)` saves it as an ordinary diffusers folder, so every consumer loads
it with `StableDiffusionXLPipeline.from_pretrained(folder)` like a real checkpoint.

Run `python -m flatlora_diffusion.sdxl.default_model [FOLDER]` to write it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from flatlora_diffusion.atomic import atomic_directory

from .tokenizer import save_tokenizer_files, vocab_size

WORLD_MODEL_DIR = Path(__file__).parents[1] / "assets" / "tiny-sdxl-world"  # committed, pretrained
RANDOM_MODEL_DIR = Path("models/tiny-sdxl")  # written on demand from a seed
TEXT_WIDTH = 64
TIME_EMBED_DIM = 16
MAX_TOKENS = 32


def text_encoder_config(projection: bool) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size(), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_WIDTH, hidden_act="gelu" if projection else "quick_gelu",
        bos_token_id=vocab_size() - 2, eos_token_id=vocab_size() - 1, pad_token_id=vocab_size() - 1,
    )


def unet_config() -> dict:
    """SDXL's UNet layout (plain first block, cross-attention blocks below) at toy width."""
    return dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(48, 96, 96),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(3, 6, 6), transformer_layers_per_block=(1, 1, 1),
        cross_attention_dim=2 * TEXT_WIDTH, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * TIME_EMBED_DIM,
        norm_num_groups=16,
    )


def vae_config() -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 64), norm_num_groups=16, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        scaling_factor=0.5, force_upcast=False,
    )


def scheduler_config() -> dict:
    """SDXL base's scheduler settings (epsilon prediction, scaled-linear betas)."""
    return dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
    )


def build_default_pipeline(seed: int = 0, tokenizer_dir: str | Path | None = None) -> StableDiffusionXLPipeline:
    """Build the tiny SDXL pipeline; the same seed gives bit-identical weights."""
    with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's RNG alone
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config())
        vae = AutoencoderKL(**vae_config())
        text_encoder = CLIPTextModel(text_encoder_config(projection=False))
        text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config(projection=True))
    if tokenizer_dir is None:
        raise ValueError("tokenizer_dir is required: tokenizers are built from files")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(**scheduler_config()),
    )


def write_default_model(folder: str | Path = RANDOM_MODEL_DIR, seed: int = 0) -> Path:
    """Write the randomly initialised model as a diffusers folder (atomically) and return its path."""
    folder = Path(folder)
    with atomic_directory(folder) as tmp:
        save_tokenizer_files(tmp / "tokenizer", max_length=MAX_TOKENS)
        save_tokenizer_files(tmp / "tokenizer_2", max_length=MAX_TOKENS)
        pipe = build_default_pipeline(seed, tokenizer_dir=tmp / "tokenizer")
        pipe.save_pretrained(tmp, safe_serialization=True)
    return folder


def ensure_default_model() -> Path:
    """The default model folder: the committed pretrained one, else the random one (written if missing)."""
    if (WORLD_MODEL_DIR / "model_index.json").is_file():
        return WORLD_MODEL_DIR
    folder = RANDOM_MODEL_DIR
    if not (folder / "model_index.json").is_file():
        write_default_model(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=str(RANDOM_MODEL_DIR))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if Path(args.folder).exists():
        print(f"error: {args.folder} already exists; remove it or choose another folder", file=sys.stderr)
        return 2
    print(f"wrote the randomly initialised tiny SDXL model to {write_default_model(args.folder, args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
