"""Train the world's AutoencoderKL: MSE + tiny KL, then the decoder alone on frozen-encoder latents."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL

from .timed_loop import run_steps

KL_WEIGHT = 1e-6  # the notes' value: enough to keep latents near N(0, sigma), too little to blur


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [n, 64, 64, 3] -> float [n, 3, 64, 64] in [-1, 1], the VAE's input space."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _vae_step(vae: AutoencoderKL, optimizer, images: np.ndarray, batch: int, generator: torch.Generator,
              decoder_only: bool) -> float:
    idx = torch.randint(0, len(images), (batch,), generator=generator).numpy()
    x = to_pixels(images[idx])
    if decoder_only:
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=generator)
        loss = (vae.decode(z).sample - x).square().mean()
    else:
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = (recon - x).square().mean() + KL_WEIGHT * posterior.kl().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def train_vae(vae: AutoencoderKL, images: np.ndarray, *, batch: int, lr: float, generator: torch.Generator,
              decoder_only: bool = False, steps: int | None = None, budget_s: float | None = None,
              log: Callable[[str], None] = print) -> int:
    """Train in place; returns the number of steps run (time-budgeted when `steps` is None)."""
    params = vae.decoder.parameters() if decoder_only else vae.parameters()
    if decoder_only:  # the post-quant conv belongs to the decoding path too
        params = list(params) + list(vae.post_quant_conv.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    vae.train()
    name = "decoder" if decoder_only else "vae"
    done, _ = run_steps(lambda i, total: _vae_step(vae, optimizer, images, batch, generator, decoder_only),
                        name, steps=steps, budget_s=budget_s, log=log)
    vae.eval()
    return done


@torch.no_grad()
def latent_stats(vae: AutoencoderKL, images: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image: the UNet samples fresh latents from them each step."""
    means, stds = [], []
    for start in range(0, len(images), batch):
        dist = vae.encode(to_pixels(images[start:start + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def psnr(vae: AutoencoderKL, images: np.ndarray, batch: int = 256) -> float:
    """Mean PSNR (dB, images in [0, 1]) of decode(posterior mean), the reconstruction generation relies on."""
    values = []
    for start in range(0, len(images), batch):
        x = to_pixels(images[start:start + batch])
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse = ((recon - x) / 2).square().mean(dim=(1, 2, 3))
        values.append(10 * torch.log10(1.0 / mse))
    return torch.cat(values).mean().item()
