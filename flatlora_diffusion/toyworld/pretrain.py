"""Pretrain the tiny SDXL model on the toy world, on a CPU, within a wall-clock budget.

    python -m flatlora_diffusion.toyworld.pretrain --minutes 40            # fit the budget, record the step counts
    python -m flatlora_diffusion.toyworld.pretrain --vae-steps V --decoder-steps D --unet-steps U   # repeat a run

Steps, top to bottom (see `pretrain`):
  1. draw the training images from the world (training combinations only), build the seeded model;
  2. train the VAE (MSE + 1e-6 KL), then its decoder alone; set scaling_factor = 1 / latent std;
  3. precompute every image's posterior (mean, std) once, so the UNet phase never runs the encoder;
  4. train the UNet and both text encoders jointly through the pipeline's own conditioning path,
     with 10 % empty (zero) captions for classifier-free guidance, Min-SNR 5 and noise offset 0.1;
  5. copy the EMA weights in and save an ordinary diffusers folder plus `training.json`.
Without explicit step counts each phase runs for its share of --minutes, watching the clock;
the counts it chose are written to training.json, and passing them back reproduces the run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline

from flatlora_diffusion.atomic import atomic_directory
from flatlora_diffusion.sdxl.conditioning import drop_captions, encode_tokens, time_ids, tokenize
from flatlora_diffusion.sdxl.default_model import WORLD_MODEL_DIR, build_default_pipeline, scheduler_config
from flatlora_diffusion.sdxl.tokenizer import save_tokenizer_files
from flatlora_diffusion.training.ema import Ema
from flatlora_diffusion.training.losses import per_sample_losses

from . import toy_world
from .pretrain_vae import latent_stats, psnr, train_vae
from .timed_loop import in_final_part, run_steps

DECAY_COMMIT_TENTHS = 7  # the UNet commits to its step count at 70 % of its time; the rest decays


@dataclass
class PretrainConfig:
    """Every knob of a pretraining run; the CLI exposes the ones a user needs to repeat or rescale it."""

    out: Path = field(default=WORLD_MODEL_DIR, metadata={"help": "diffusers folder to write"})
    seed: int = field(default=0, metadata={"help": "seeds the world, the model init and every batch"})
    minutes: float = field(default=40.0, metadata={"help": "wall-clock budget for phases without step counts"})
    images: int = field(default=32_000, metadata={"help": "training images; ~150 per combination"})
    vae_steps: int | None = field(default=None, metadata={"help": "VAE steps; None: its share of the budget"})
    decoder_steps: int | None = field(default=None, metadata={"help": "decoder-only steps; None: budget"})
    unet_steps: int | None = field(default=None, metadata={"help": "UNet + text encoder steps; None: budget"})
    # The VAE gets a larger share than the notes' 5.5 + 3 of 42 min: on a contended CPU it gets few
    # steps, and a blurry VAE caps shape accuracy whatever the UNet learns.
    vae_share: float = field(default=0.2, metadata={"help": "budget share of the VAE (8 min of 40)"})
    decoder_share: float = field(default=0.05, metadata={"help": "budget share of the decoder (2 min of 40)"})
    reserve_s: float = field(default=45.0, metadata={"help": "budget kept back for the final save"})
    vae_batch: int = 16  # half the notes' 32: twice the updates per CPU-second when the CPU is shared
    vae_lr: float = 2e-3
    decoder_lr: float = 3e-4  # lower: the decoder only sharpens what it already does
    unet_batch: int = 64  # the notes used 128 on two free cores; a shared CPU gives ~1/5 of that
    lr: float = 8e-4
    warmup_steps: int = field(default=50, metadata={"help": "linear LR warm-up; decay is the last 30 %"})
    max_unet_steps: int = field(default=2000, metadata={"help": "cap; the notes' run reached 95 % shape at ~2000"})
    caption_dropout: float = field(default=0.1, metadata={"help": "share of zeroed captions (CFG's uncond)"})
    min_snr_gamma: float = 5.0
    noise_offset: float = 0.1
    ema_decay: float = 0.999
    threads: int = field(default=1, metadata={"help": "torch CPU threads; 1 is fastest on a shared CPU"})
    psnr_images: int = field(default=256, metadata={"help": "held-out images the VAE's PSNR is measured on"})

    def __post_init__(self):
        self.out = Path(self.out)
        for name in ("images", "vae_batch", "unet_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("vae_steps", "decoder_steps", "unet_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"PretrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("min_snr_gamma", "noise_offset"):
            if getattr(self, name) < 0:
                raise ValueError(f"PretrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"PretrainConfig.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.minutes <= 0:
            raise ValueError(f"PretrainConfig.minutes must be > 0, got {self.minutes}")


def derive_seed(seed: int, name: str) -> int:
    """Independent, stable streams per purpose: (seed, name) -> seed, no clock, no global RNG."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


def generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, name))


class Log:
    """Timestamped lines, flushed at once so a background run's log file can be followed."""

    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        print(f"{self.elapsed() / 60:6.1f} min | {message}", flush=True)


def lr_factor(step: int, total: int | None, warmup: int) -> float:
    """Linear warm-up, flat, then cosine decay to 10 % over the last 30 % (once the total is known)."""
    factor = min(1.0, (step + 1) / warmup)
    if in_final_part(step, total, DECAY_COMMIT_TENTHS):
        progress = (step - 0.7 * total) / max(1.0, 0.3 * total)
        factor *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _budget(cfg: PretrainConfig, steps: int | None, share: float | None, log: Log) -> float | None:
    """Seconds for a phase without a step count: its share, or (share None) all that is left."""
    if steps is not None:
        return None
    if share is not None:
        return share * cfg.minutes * 60
    return max(30.0, cfg.minutes * 60 - log.elapsed() - cfg.reserve_s)


def train_autoencoder(pipe, images: np.ndarray, cfg: PretrainConfig, record: dict, log: Log) -> None:
    """Step 2: the VAE, then its decoder, then the latent scale."""
    vae = pipe.vae
    held = toy_world.render_many(toy_world.sample_scenes(derive_seed(cfg.seed, "psnr"), cfg.psnr_images,
                                                         toy_world.held_out_combos()))
    g = generator(cfg.seed, "vae")
    record["vae_steps"] = train_vae(vae, images, batch=cfg.vae_batch, lr=cfg.vae_lr, generator=g,
                                    steps=cfg.vae_steps, log=log,
                                    budget_s=_budget(cfg, cfg.vae_steps, cfg.vae_share, log))
    record["vae_psnr_db"] = psnr(vae, held)
    log(f"VAE PSNR on held-out images: {record['vae_psnr_db']:.2f} dB")
    record["decoder_steps"] = train_vae(vae, images, batch=cfg.vae_batch, lr=cfg.decoder_lr, generator=g,
                                        decoder_only=True, steps=cfg.decoder_steps,
                                        budget_s=_budget(cfg, cfg.decoder_steps, cfg.decoder_share, log), log=log)
    record["vae_psnr_after_decoder_db"] = psnr(vae, held)
    log(f"VAE PSNR after the decoder fine-tune: {record['vae_psnr_after_decoder_db']:.2f} dB")


def precompute_latents(pipe, images: np.ndarray, record: dict, log: Log):
    """Step 3: posterior (mean, std) of every image, and scaling_factor from the latents' std."""
    mean, std = latent_stats(pipe.vae, images)
    latent_std = torch.sqrt(mean.var() + std.square().mean()).item()  # std of sampled latents
    pipe.vae.register_to_config(scaling_factor=1.0 / latent_std)
    record["scaling_factor"] = 1.0 / latent_std
    log(f"latents {tuple(mean.shape)} precomputed; std {latent_std:.3f} -> scaling_factor {1 / latent_std:.4f}")
    return mean, std


def _unet_step(pipe, optimizer, scheduler, ema, data, cfg: PretrainConfig, g, i: int, total: int | None) -> float:
    mean, std, ids, ids_2 = data
    idx = torch.randint(0, len(mean), (cfg.unet_batch,), generator=g)
    latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * pipe.vae.config.scaling_factor
    keep = torch.rand(cfg.unet_batch, generator=g) >= cfg.caption_dropout
    embeds, pooled = drop_captions(*encode_tokens(pipe.text_encoder, pipe.text_encoder_2, ids[idx], ids_2[idx]), keep)
    added = {"text_embeds": pooled, "time_ids": time_ids(cfg.unet_batch)}
    loss = per_sample_losses(scheduler, lambda noisy, t: pipe.unet(noisy, t, embeds, added_cond_kwargs=added).sample,
                             latents, g, cfg.noise_offset, cfg.min_snr_gamma).mean()
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * lr_factor(i, total, cfg.warmup_steps)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
    optimizer.step()
    ema.update()
    return loss.item()


def train_denoiser(pipe, latents, captions: list[str], cfg: PretrainConfig, record: dict, log: Log) -> None:
    """Step 4: UNet + both text encoders, jointly, through the pipeline's conditioning path."""
    mean, std = latents
    data = (mean, std, tokenize(pipe.tokenizer, captions), tokenize(pipe.tokenizer_2, captions))
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    for module in modules.values():
        module.train()
    params = [p for module in modules.values() for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    scheduler = DDPMScheduler(**scheduler_config())  # epsilon prediction, as the saved pipeline's scheduler
    ema, g = Ema(modules, cfg.ema_decay), generator(cfg.seed, "unet")
    record["unet_steps"], _ = run_steps(
        lambda i, total: _unet_step(pipe, optimizer, scheduler, ema, data, cfg, g, i, total), "unet",
        steps=cfg.unet_steps, budget_s=_budget(cfg, cfg.unet_steps, None, log), commit_tenths=DECAY_COMMIT_TENTHS,
        max_steps=cfg.max_unet_steps, log=log)
    ema.copy_to_modules()
    for module in modules.values():
        module.eval()


def save_world_model(pipe: StableDiffusionXLPipeline, folder: Path, record: dict) -> Path:
    """Step 5: an ordinary diffusers folder (safetensors, fp32) plus the run's record."""
    with atomic_directory(folder) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return folder


def pretrain(cfg: PretrainConfig, log: Log | None = None) -> dict:
    """Run all five steps; returns the record that is also saved as training.json."""
    log = log or Log()
    record: dict = {"config": asdict(cfg), "torch": torch.__version__, "threads": torch.get_num_threads()}
    scenes = toy_world.sample_scenes(derive_seed(cfg.seed, "world"), cfg.images, toy_world.train_combos())
    images = toy_world.render_many(scenes)
    log(f"{len(images)} world images drawn from {len(toy_world.train_combos())} training combinations")
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        save_tokenizer_files(tokenizer_dir)
        pipe = build_default_pipeline(seed=cfg.seed, tokenizer_dir=tokenizer_dir)
    train_autoencoder(pipe, images, cfg, record, log)
    latents = precompute_latents(pipe, images, record, log)
    del images  # ~400 MB; only the latents are needed from here on
    train_denoiser(pipe, latents, [s.caption for s in scenes], cfg, record, log)
    record["minutes"] = log.elapsed() / 60
    record["reproduce"] = (f"python -m flatlora_diffusion.toyworld.pretrain --seed {cfg.seed} --images {cfg.images} "
                           f"--vae-steps {record['vae_steps']} --decoder-steps {record['decoder_steps']} "
                           f"--unet-steps {record['unet_steps']}")
    save_world_model(pipe, cfg.out, record)
    log(f"saved {cfg.out} after {record['minutes']:.1f} min; repeat with: {record['reproduce']}")
    return record


def parse_args(argv: list[str] | None) -> PretrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = PretrainConfig()
    parser.add_argument("--out", type=Path, default=defaults.out)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--minutes", type=float, default=defaults.minutes)
    parser.add_argument("--images", type=int, default=defaults.images)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    for name in ("vae_steps", "decoder_steps", "unet_steps"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                            help=PretrainConfig.__dataclass_fields__[name].metadata["help"])
    return PretrainConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # One thread: on an oversubscribed CPU two OpenMP threads spin-wait on each other; measured here
    # (load ~9 on 2 cores) a VAE step took 0.28 CPU-s with one thread and 3.7 CPU-s with two.
    torch.set_num_threads(cfg.threads)
    pretrain(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
