"""The diffusion training loss for SDXL (epsilon or v-prediction, from the scheduler config)."""

from __future__ import annotations

import torch


def noisy_inputs(scheduler, latents: torch.Tensor, generator: torch.Generator):
    """Draw noise and timesteps from `generator` (CPU, so the stream is device-independent)."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
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


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction.float() - target.float()).square().mean(dim=tuple(range(1, prediction.ndim)))
