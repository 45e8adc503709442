"""A deterministic validation loss: the denoising error on fixed images, noise and timesteps.

Every evaluation of a run sees the same inputs, so the curve moves only because the LoRA does
(a training loss jumps with each step's random image, timestep and noise):
- images: `--validation_data_dir` (held out) or the instance images, centre-cropped at the
  training size (their aspect bucket with `--aspect_buckets`), never flipped, encoded once;
- timesteps: the midpoints of VALIDATION_TIMESTEPS equal slices of the schedule
  (125, 375, 625, 875 of 1000), every image at each of them;
- noise (and the latent sample): from a private generator seeded by the run seed and the
  image's index, recreated at every evaluation.

The loss is the plain MSE against the scheduler's target (epsilon or v), without Min-SNR
weights or noise offset, so runs with different loss settings compare on one scale. It runs in
eval mode (no LoRA dropout), outside `FlatLora.perturb` (no weight noise), under no_grad, and it
draws from no RNG the training streams use: a resumed run stays bit-exact, and so does the loss.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from flatlora_diffusion.data.buckets import make_buckets, nearest_bucket
from flatlora_diffusion.data.examples import Example, derived_seed, load_examples, prepare_image
from flatlora_diffusion.data.images import load_rgb
from flatlora_diffusion.sdxl.conditioning import encode_prompts

from .losses import per_sample_mse, prediction_target

VALIDATION_TIMESTEPS = 4


@dataclass(frozen=True)
class _Image:
    mean: torch.Tensor  # latent distribution of the image (1, C, h, w), fp32
    std: torch.Tensor
    time_ids: torch.Tensor  # (1, 6)
    prompt: str
    seed: int


def fixed_timesteps(num_train_timesteps: int, count: int = VALIDATION_TIMESTEPS) -> torch.Tensor:
    """The midpoints of `count` equal slices of [0, num_train_timesteps)."""
    return torch.tensor([(2 * k + 1) * num_train_timesteps // (2 * count) for k in range(count)])


@contextlib.contextmanager
def eval_mode(models: list[torch.nn.Module]) -> Iterator[None]:
    """Every submodule in eval mode for the block (dropout off), each one's own flag restored after."""
    flags = [(module, module.training) for model in models for module in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


class ValidationLoss:
    """The validation loss of the models of one run (build with `build_validation_loss`)."""

    def __init__(self, examples: list[Example], config, parts, models: dict[str, torch.nn.Module], accelerator):
        self.every, self.config, self.parts, self.accelerator = config.validation_loss_every, config, parts, accelerator
        self.unet = models["unet"]
        self.text_encoders = [models.get(name, getattr(parts, name)) for name in ("text_encoder", "text_encoder_2")]
        self.timesteps = fixed_timesteps(parts.noise_scheduler.config.num_train_timesteps)
        self.images = [self._encode(example, index) for index, example in enumerate(examples)]

    def due(self, step: int, total_steps: int) -> bool:
        """After every `every`-th optimizer step and after the last one."""
        return step % self.every == 0 or step == total_steps

    def metrics_at(self, step: int, total_steps: int) -> dict[str, float]:
        """{"val_loss": value} when an evaluation is due after `step`, else {} (the metrics.jsonl fields)."""
        return {"val_loss": self()} if self.due(step, total_steps) else {}

    @torch.no_grad()
    def __call__(self) -> float:
        """The mean loss over every (image, timestep) with the models' current LoRA weights."""
        with eval_mode([self.unet, *self.text_encoders]):
            losses = [self._image_losses(image) for image in self.images]
        return torch.cat(losses).mean().item()

    def _image_losses(self, image: _Image) -> torch.Tensor:
        scheduler, n = self.parts.noise_scheduler, len(self.timesteps)
        generator = torch.Generator().manual_seed(image.seed)
        latents = (image.mean + image.std * torch.randn(image.mean.shape, generator=generator))
        latents = (latents * self.parts.vae.config.scaling_factor).repeat(n, 1, 1, 1)
        noise = torch.randn(latents.shape, generator=generator)
        device, dtype = self.accelerator.device, self.unet.dtype
        latents, noise, timesteps = latents.to(device), noise.to(device), self.timesteps.to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps).to(dtype)
        with self.accelerator.autocast():
            embeds = encode_prompts(self.text_encoders, self.parts.tokenizers, [image.prompt], device)
            prediction = self.unet(noisy, timesteps, embeds.hidden.expand(n, -1, -1), added_cond_kwargs={
                "text_embeds": embeds.pooled.expand(n, -1), "time_ids": image.time_ids.repeat(n, 1).to(device)}).sample
        return per_sample_mse(prediction, prediction_target(scheduler, latents, noise, timesteps))

    @torch.no_grad()
    def _encode(self, example: Example, index: int) -> _Image:
        cfg, vae = self.config, self.parts.vae
        size = nearest_bucket(*example.size, make_buckets(cfg.resolution)) if cfg.aspect_buckets else cfg.resolution
        prepared = prepare_image(load_rgb(example.path), size, center_crop=True, random_flip=False, seed=cfg.seed,
                                 epoch=0, index=index)
        dist = vae.encode(prepared.pixels.unsqueeze(0).to(self.accelerator.device, vae.dtype)).latent_dist
        return _Image(dist.mean.float().cpu(), dist.std.float().cpu(), prepared.time_ids.unsqueeze(0), example.prompt,
                      derived_seed("validation-loss", cfg.seed, index))


def build_validation_loss(config, parts, models: dict[str, torch.nn.Module], accelerator) -> ValidationLoss | None:
    """The run's ValidationLoss on the main process when --validation_loss_every is set, else None.

    `models` are the unwrapped trained models: evaluating through a DDP wrapper on one rank only
    could start a collective the other ranks never join.
    """
    if config.validation_loss_every is None or not accelerator.is_main_process:
        return None
    folder = config.validation_data_dir or config.instance_data_dir
    what = "validation" if config.validation_data_dir else "instance"
    examples = load_examples(folder, config.instance_prompt, config.caption_extension, what=what)
    return ValidationLoss(examples, config, parts, models, accelerator)
