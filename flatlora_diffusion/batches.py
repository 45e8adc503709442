"""Turning the shuffled example streams into SDXL training batches, with optional caches.

VAE latents are cached when the crop is deterministic (centre crop): each image is encoded at
most twice (plain and flipped), and the latent distribution's mean and std are kept so a fresh
sample is still drawn every step. Prompt embeddings are cached when the text encoders are frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .conditioning import PromptEmbeds, encode_prompts
from .data import Example, Prepared, prepare_image, stream_index
from .images import load_rgb


@dataclass
class Batch:
    latents: torch.Tensor
    prompts: list[str]
    time_ids: torch.Tensor


class ExampleStream:
    """An endless, per-epoch shuffled stream over examples (repeated `repeats` times)."""

    def __init__(self, examples: list[Example], seed: int, repeats: int = 1):
        self.examples, self.seed, self.repeats = examples, seed, repeats

    def __len__(self) -> int:
        return len(self.examples) * self.repeats

    def at(self, position: int) -> tuple[int, int]:
        index, epoch = stream_index(len(self), self.seed, position)
        return index % len(self.examples), epoch


class BatchMaker:
    def __init__(self, parts, config, device, latent_dtype, text_encoders=None):
        """`text_encoders`: the (possibly DDP-wrapped) encoders being trained; None = frozen, cached."""
        self.parts, self.config, self.device, self.latent_dtype = parts, config, device, latent_dtype
        self.cache_latents = config.center_crop
        self.cache_prompts = text_encoders is None
        self.text_encoders = text_encoders or parts.text_encoders
        self._latent_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._prompt_cache: dict[str, PromptEmbeds] = {}

    def batch(self, stream: ExampleStream, positions: list[int], generator: torch.Generator) -> Batch:
        samples = [self._sample(stream, p) for p in positions]
        means, stds = zip(*(self._latent_dist(stream.examples[i], prepared, i) for i, prepared in samples))
        mean, std = torch.stack(means), torch.stack(stds)
        noise = torch.randn(mean.shape, generator=generator, device="cpu").to(mean.device)
        latents = (mean + std * noise) * self.parts.vae.config.scaling_factor
        prompts = [stream.examples[i].prompt for i, _ in samples]
        time_ids = torch.stack([prepared.time_ids for _, prepared in samples])
        return Batch(latents.to(self.device, self.latent_dtype), prompts, time_ids.to(self.device))

    def _sample(self, stream: ExampleStream, position: int) -> tuple[int, Prepared]:
        index, epoch = stream.at(position)
        cfg = self.config
        prepared = prepare_image(load_rgb(stream.examples[index].path), cfg.resolution, cfg.center_crop,
                                 cfg.random_flip, stream.seed, epoch, index)
        return index, prepared

    @torch.no_grad()
    def _latent_dist(self, example: Example, prepared: Prepared, index: int):
        key = (example.path, prepared.crop_top_left, prepared.flipped)
        if self.cache_latents and key in self._latent_cache:
            return self._latent_cache[key]
        vae = self.parts.vae
        pixels = prepared.pixels.unsqueeze(0).to(self.device, vae.dtype)
        dist = vae.encode(pixels).latent_dist
        value = (dist.mean[0].float(), dist.std[0].float())
        if self.cache_latents:
            self._latent_cache[key] = value
        return value

    def embeds(self, prompts: list[str]) -> PromptEmbeds:
        if not self.cache_prompts:
            return encode_prompts(self.text_encoders, self.parts.tokenizers, prompts, self.device)
        missing = sorted({p for p in prompts if p not in self._prompt_cache})
        if missing:
            with torch.no_grad():
                encoded = encode_prompts(self.text_encoders, self.parts.tokenizers, missing, self.device)
            for k, prompt in enumerate(missing):
                self._prompt_cache[prompt] = PromptEmbeds(encoded.hidden[k:k + 1], encoded.pooled[k:k + 1])
        return PromptEmbeds.cat([self._prompt_cache[p] for p in prompts])
