"""Sharpness in the full weight space: how much the training loss rises under Flat-LoRA's own noise.

E[L(W' + eps) - L(W')] per radius rho, on (up to) SHARPNESS_IMAGES of the task's training images with
their captions, at fixed timesteps and fixed noise; eps is filter-wise exactly as in Flat-LoRA
(paper Eq. 7): std rho * ||W'_i|| / sqrt(n) per output row of every LoRA-targeted Linear of the UNet
and both text encoders (FlatLora with a constant schedule draws it without writing the weights).
"""

from __future__ import annotations

import numpy as np
import torch

from flatlora_diffusion.flat.flat_lora import FlatLora
from flatlora_diffusion.sdxl.conditioning import encode_tokens, time_ids, tokenize

SHARPNESS_TIMESTEPS = (100, 300, 500, 700, 900)  # fixed, spread over the noise range
SHARPNESS_IMAGES = 8


def lora_models(pipe) -> dict[str, torch.nn.Module]:
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}


@torch.no_grad()
def training_latents(pipe, task) -> tuple[torch.Tensor, list[str]]:
    """VAE latents (scaled as the UNet sees them) of the first training images, and their captions."""
    images, captions = task.training_images()
    images, captions = images[:SHARPNESS_IMAGES], captions[:SHARPNESS_IMAGES]
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor, captions


@torch.no_grad()
def fixed_loss(pipe, latents: torch.Tensor, captions: list[str], noise: torch.Tensor) -> float:
    """Mean epsilon-prediction error of every latent at every SHARPNESS_TIMESTEPS, fixed noise.

    The text encoders run inside, so perturbations of their LoRA layers count too.
    """
    k = len(SHARPNESS_TIMESTEPS)
    x0 = latents.repeat_interleave(k, 0)
    t = torch.tensor(SHARPNESS_TIMESTEPS).repeat(len(latents))
    ab = pipe.scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    ids = tokenize(pipe.tokenizer, captions), tokenize(pipe.tokenizer_2, captions)
    embeds, pooled = encode_tokens(pipe.text_encoder, pipe.text_encoder_2, *ids)
    n = len(x0)
    pred = pipe.unet(noisy, t, encoder_hidden_states=embeds.repeat_interleave(k, 0),
                     added_cond_kwargs={"text_embeds": pooled.repeat_interleave(k, 0), "time_ids": time_ids(n)}).sample
    return float((pred - noise).square().mean())


def sharpness(pipe, task, rhos: tuple[float, ...], draws: int, seed: int = 0) -> dict[str, float]:
    """{"loss": L(W'), "sharpness_<rho>": E[L(W' + eps) - L(W')]} for each radius."""
    latents, captions = training_latents(pipe, task)
    noise = torch.randn((len(latents) * len(SHARPNESS_TIMESTEPS), *latents.shape[1:]),
                        generator=torch.Generator().manual_seed(seed))
    base = fixed_loss(pipe, latents, captions, noise)
    out = {"loss": base}
    for rho in rhos:
        flat = FlatLora(lora_models(pipe), sigma=rho, schedule="constant", seed=seed + 1000)
        increases = []
        for draw in range(draws):
            with flat.perturb(draw):
                increases.append(fixed_loss(pipe, latents, captions, noise) - base)
        out[f"sharpness_{rho:g}"] = float(np.mean(increases))
    return out
