"""DreamBooth LoRA training for SDXL under Flat-LoRA: one optimizer step, then the loop that reads in one screen
(the set-up is in setup.py, what a run writes in outputs.py)."""

from __future__ import annotations

import contextlib
import functools
import signal
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flatlora_diffusion.data.batches import Batch
from flatlora_diffusion.data.captions import augment_captions
from flatlora_diffusion.data.examples import derived_seed
from flatlora_diffusion.sdxl.conditioning import PromptEmbeds

from .config import TrainConfig
from .losses import per_sample_losses
from .metrics import MetricsLog
from .multiprocess import any_rank, dump_rank_state
from .nonfinite import update_if_finite
from .outputs import checkpoint, finish, resolved_config, validate, write_json
from .run import Run, unwrapped
from .setup import setup


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived; a checkpoint was saved at `step`."""

    def __init__(self, step: int, folder: Path):
        super().__init__(f"interrupted at step {step}; checkpoint saved to {folder}")
        self.step, self.folder = step, folder


# ------------------------------------------------------------------ one optimizer step

def micro_batch(run: Run, step: int, micro: int) -> tuple[Batch, PromptEmbeds, int, torch.Generator]:
    """The samples of (step, micro) for this process, and a generator for its noise/timesteps."""
    cfg, acc = run.config, run.accelerator
    batch_number = (step * cfg.gradient_accumulation_steps + micro) * acc.num_processes + acc.process_index
    draws = run.instances.draw(batch_number, cfg.train_batch_size)
    generator = torch.Generator().manual_seed(derived_seed("step", cfg.seed, step, micro, acc.process_index))
    batch = run.batches.batch(run.instances, draws, generator)
    batch.prompts = augment_captions(batch.prompts, cfg, batch_number)  # instance captions only
    n_instance = len(draws)
    if run.classes is not None:
        subset_of = [run.instances.examples[d.index].subset for d in draws]
        for stream, prior_draws in run.classes.draw_like(batch_number, subset_of, draws):
            batch = Batch.cat(batch, run.batches.batch(stream, prior_draws, generator))
    with run.accelerator.autocast():  # text encoders in the training precision; the VAE ran outside
        embeds = run.batches.embeds(batch.prompts)
    return batch, embeds, n_instance, generator


def unet_prediction(run: Run, batch: Batch, embeds: PromptEmbeds, noisy: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    with run.accelerator.autocast():
        return run.trained["unet"](
            noisy, timesteps, embeds.hidden,
            added_cond_kwargs={"text_embeds": embeds.pooled, "time_ids": batch.time_ids}).sample


def compute_loss(run: Run, batch: Batch, embeds: PromptEmbeds, n_instance: int,
                 generator: torch.Generator) -> torch.Tensor:
    predict = functools.partial(unet_prediction, run, batch, embeds)
    losses = per_sample_losses(run.parts.noise_scheduler, predict, batch.latents, generator,
                               run.config.noise_offset, run.config.snr_gamma, batch.masks) * batch.weights
    loss = losses[:n_instance].mean()
    if len(losses) > n_instance:  # the class images; their weights carry prior_loss_weight
        loss = loss + losses[n_instance:].mean()
    return loss


def optimizer_step(run: Run, step: int) -> tuple[torch.Tensor, bool]:
    """All micro-batches of one optimizer step under one Flat-LoRA noise draw, then the update.

    Returns (loss, applied): a NaN/inf loss or gradient skips the update (training/nonfinite.py).
    """
    cfg, acc = run.config, run.accelerator
    total = torch.zeros((), device=acc.device)
    with run.flat.perturb(step):
        for micro in range(cfg.gradient_accumulation_steps):
            last = micro == cfg.gradient_accumulation_steps - 1
            with contextlib.nullcontext() if last else no_sync(run):
                batch, embeds, n_instance, generator = micro_batch(run, step, micro)
                loss = compute_loss(run, batch, embeds, n_instance, generator) / cfg.gradient_accumulation_steps
                acc.backward(loss)
            total += loss.detach()  # no .item() here: it would wait for the GPU every micro-batch
    return total, update_if_finite(acc, run.optimizer, run.lr_scheduler, run.ema, total, cfg.max_grad_norm)


def no_sync(run: Run) -> contextlib.ExitStack:
    """Skip the gradient all-reduce of every trained model on all but the last micro-batch."""
    stack = contextlib.ExitStack()
    for model in run.trained.values():
        stack.enter_context(run.accelerator.no_sync(model))
    return stack


# ------------------------------------------------------------------ the loop

def train(config: TrainConfig) -> Path:
    """Run the whole job; returns the output folder. User errors raise UserError."""
    run = setup(config)
    acc = run.accelerator
    if acc.is_main_process:
        write_json(run.output_dir / "config.json", resolved_config(run))
    log = MetricsLog(run.output_dir / "metrics.jsonl", run.start_step) if acc.is_main_process else None
    if config.report_to:
        acc.init_trackers("flatlora-dreambooth", config={k: str(v) for k, v in config.to_dict().items()})
    bar = tqdm(range(run.start_step, run.total_steps), initial=run.start_step, total=run.total_steps,
               desc="training", disable=not acc.is_main_process)
    with stop_on_signals() as stop:
        for step in bar:
            started = time.perf_counter()
            total, applied = optimizer_step(run, step)
            loss = acc.reduce(total, "mean").item()
            run.guard.observe(step + 1, applied)
            sigma_t = run.flat.sigma_at(step)
            bar.set_postfix(loss=f"{loss:.4f}", sigma_t=f"{sigma_t:.4f}", **run.guard.postfix())
            record(run, log, step + 1, loss, sigma_t, time.perf_counter() - started)
            after_step(run, step + 1, stop)
    dump_rank_state(unwrapped(run), run.flat, run.total_steps - 1, acc.process_index)  # tests only, off by default
    finish(run)
    acc.end_training()
    return run.output_dir


def record(run: Run, log: MetricsLog | None, step: int, loss: float, sigma_t: float, seconds: float) -> None:
    values = dict(step=step, loss=loss, lr=run.lr_scheduler.get_last_lr()[0], sigma_t=sigma_t, seconds=seconds,
                  **run.guard.metrics())
    values.update(run.validation.metrics_at(step, run.total_steps) if run.validation else {})
    if log is not None:
        log.write(**values)
    if run.config.report_to:
        run.accelerator.log({k: v for k, v in values.items() if k != "step"}, step=step)


def after_step(run: Run, step: int, stop: dict) -> None:
    """Checkpoints, samples and a clean stop on Ctrl-C/SIGTERM, between optimizer steps."""
    cfg = run.config
    run.guard.stop_if_stuck(step, run.output_dir)
    stopping = any_rank(run.accelerator, stop["signal"] is not None)  # every rank checkpoints and stops together
    if step % cfg.checkpointing_steps == 0 or stopping:
        folder = checkpoint(run, step)
        if stopping:
            raise Interrupted(step, folder)
    if cfg.validation_steps and step % cfg.validation_steps == 0 and step < run.total_steps:
        validate(run, f"step{step:06d}")


@contextlib.contextmanager
def stop_on_signals():
    """Turn Ctrl-C/SIGTERM into a flag the loop reads between steps (then checkpoint and stop)."""
    stop = {"signal": None}

    def handler(signum, _frame):
        stop["signal"] = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
