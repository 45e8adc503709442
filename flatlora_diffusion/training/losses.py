"""The diffusion training loss for SDXL: epsilon or v-prediction (read from the scheduler config),
optional noise offset and Min-SNR weighting. One home for the LoRA trainer and the world model's
pre-training (`per_sample_losses`)."""

from __future__ import annotations

from typing import Callable

import torch


def noisy_inputs(scheduler, latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0):
    """Draw noise and timesteps from `generator` (CPU, so the stream is device-independent).

    noise_offset: adds offset·N(0, 1) per (sample, channel), letting the model shift an image's
    mean brightness/colour (Guttenberg 2023, "Diffusion with offset noise").
    """
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
    noise = noise.to(latents.device, latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator).to(latents.device)
    return noise, timesteps, scheduler.add_noise(latents, noise, timesteps)


def prediction_target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample; with a (B, 1, h, w) mask, the mask-weighted mean over the masked
    latent pixels (so a small mask does not shrink the loss; an all-black mask gives 0)."""
    error = (prediction.float() - target.float()).square()
    if mask is None:
        return error.mean(dim=tuple(range(1, prediction.ndim)))
    mask = mask.float().expand_as(error)
    return (error * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp(min=1e-8)


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) of each timestep."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, Eq. 8).

    With an epsilon target the MSE already carries a factor SNR, so w = min(SNR, gamma) / SNR;
    with a v target the factor is SNR + 1, so w = min(SNR, gamma) / (SNR + 1).
    """
    ratio = snr(scheduler, timesteps)
    clipped = ratio.clamp(max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (ratio + 1.0)
    return clipped / ratio


def per_sample_losses(scheduler, predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                      latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0,
                      snr_gamma: float = 0.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The (Min-SNR weighted) squared error of `predict(noisy, timesteps)` against the scheduler's target,
    one value per sample; noise and timesteps come from `generator` (see `noisy_inputs`); `mask`: see
    `per_sample_mse` (--masked_loss)."""
    noise, timesteps, noisy = noisy_inputs(scheduler, latents, generator, noise_offset)
    target = prediction_target(scheduler, latents, noise, timesteps)
    losses = per_sample_mse(predict(noisy, timesteps), target, mask)
    if snr_gamma:
        losses = losses * min_snr_weights(scheduler, timesteps, snr_gamma)
    return losses
