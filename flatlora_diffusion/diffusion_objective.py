"""The denoising objective used to pretrain the world model: epsilon prediction, Min-SNR weighting, noise offset.

A small pure-torch object, so the training loop only says `loss = objective(unet_fn, latents, generator)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class EpsilonObjective:
    """Epsilon-prediction loss on the scheduler's forward process.

    min_snr_gamma: Min-SNR weighting (Hang et al. 2023, eq. 8 for epsilon prediction:
        w_t = min(SNR_t, gamma) / SNR_t), which stops the many easy low-noise steps dominating.
    noise_offset: add offset * N(0, 1) per (sample, channel) to the noise, so the model can
        change an image's mean colour (Guttenberg 2023, "Diffusion with offset noise"); our
        images are mostly one flat colour, which is exactly what plain noise makes hard.
    """

    alphas_cumprod: torch.Tensor
    min_snr_gamma: float = field(default=5.0, metadata={"help": "Min-SNR gamma; 0 disables the weighting"})
    noise_offset: float = field(default=0.1, metadata={"help": "std of the per-channel noise offset"})

    def __post_init__(self):
        if self.min_snr_gamma < 0:
            raise ValueError(f"min_snr_gamma must be >= 0, got {self.min_snr_gamma}")
        if self.noise_offset < 0:
            raise ValueError(f"noise_offset must be >= 0, got {self.noise_offset}")
        self.alphas_cumprod = self.alphas_cumprod.float()

    def sample(self, latents: torch.Tensor, generator: torch.Generator):
        """(noisy latents, timesteps, noise target) for a batch of clean latents."""
        b, c = latents.shape[:2]
        noise = torch.randn(latents.shape, generator=generator)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn((b, c, 1, 1), generator=generator)
        t = torch.randint(0, len(self.alphas_cumprod), (b,), generator=generator)
        ab = self.alphas_cumprod[t].view(b, 1, 1, 1)
        return ab.sqrt() * latents + (1 - ab).sqrt() * noise, t, noise

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        if not self.min_snr_gamma:
            return torch.ones(len(t))
        ab = self.alphas_cumprod[t]
        snr = ab / (1 - ab)
        return snr.clamp(max=self.min_snr_gamma) / snr

    def __call__(self, predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], latents: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        """Weighted mean squared error of `predict(noisy, t)` against the noise."""
        noisy, t, noise = self.sample(latents, generator)
        per_sample = (predict(noisy, t) - noise).square().mean(dim=(1, 2, 3))
        return (self.weights(t) * per_sample).mean()
