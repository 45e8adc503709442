"""DreamBooth LoRA training for SDXL under Flat-LoRA: setup, then one readable loop."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from flatlora_diffusion import __version__
from flatlora_diffusion.atomic import atomic_file
from flatlora_diffusion.data.batches import Batch, BatchMaker
from flatlora_diffusion.data.captions import augment_captions
from flatlora_diffusion.data.class_pools import ClassStreams
from flatlora_diffusion.data.dataset_config import subsets_as_dicts
from flatlora_diffusion.data.examples import derived_seed
from flatlora_diffusion.errors import UserError
from flatlora_diffusion.flat.flat_lora import FlatLora
from flatlora_diffusion.lora.attach import (
    add_text_encoder_lora,
    add_unet_lora,
    freeze_lora_after_hidden_state,
)
from flatlora_diffusion.sdxl.conditioning import PromptEmbeds
from flatlora_diffusion.sdxl.default_model import ensure_default_model
from flatlora_diffusion.sdxl.models import SDXLParts, freeze_precision, load_sdxl, shareable_model_name
from flatlora_diffusion.sdxl.sampling import pipeline_from_parts, sample_images

from .checkpoint import load_checkpoint, load_checkpoint_tensors, resolve_checkpoint, save_checkpoint
from .config import TrainConfig
from .data_setup import build_streams, load_instances, prepare_class_pools
from .ema import Ema
from .losses import per_sample_losses
from .metrics import MetricsLog
from .multiprocess import all_rng_states, any_rank, check_launch, dump_rank_state
from .nonfinite import NonfiniteGuard, update_if_finite
from .optimizers import build_optimizer
from .perturbation import NoPerturbation, make_perturbation
from .preflight import preflight
from .validation_loss import ValidationLoss, build_validation_loss

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SDXL_TEXT_ENCODER_1_HIDDEN_STATE = -2  # the hidden state conditioning.encode_prompts reads from text encoder 1


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived; a checkpoint was saved at `step`."""

    def __init__(self, step: int, folder: Path):
        super().__init__(f"interrupted at step {step}; checkpoint saved to {folder}")
        self.step, self.folder = step, folder


@dataclass
class Run:
    config: TrainConfig
    accelerator: Accelerator
    parts: SDXLParts
    trained: dict[str, torch.nn.Module]
    flat: FlatLora | NoPerturbation
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    batches: BatchMaker
    instances: object  # SquareStream or BucketStream
    classes: ClassStreams | None
    total_steps: int
    subsets: list = field(default_factory=list)  # the resolved data/dataset_config.Subset list
    start_step: int = 0
    ema: Ema | None = None
    validation: ValidationLoss | None = None  # --validation_loss_every, main process only
    guard: NonfiniteGuard | None = None  # skipped non-finite steps (set in setup)
    started_at: float = field(default_factory=time.time)  # Unix time, for ss_training_started_at

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)


# ------------------------------------------------------------------ setup

def resolve_model_path(config: TrainConfig) -> str:
    if config.pretrained_model_name_or_path:
        return config.pretrained_model_name_or_path
    return str(ensure_default_model())


def count_total_steps(config: TrainConfig, n_samples: int, world_size: int) -> int:
    if config.max_train_steps:
        return config.max_train_steps
    per_step = config.train_batch_size * config.gradient_accumulation_steps * world_size
    return config.num_train_epochs * math.ceil(n_samples / per_step)


def attach_lora(config: TrainConfig, parts: SDXLParts) -> dict[str, torch.nn.Module]:
    options = config.lora_options()
    trained = {"unet": add_unet_lora(parts.unet, options)}
    if config.train_text_encoder:
        trained["text_encoder"] = add_text_encoder_lora(parts.text_encoder, options)
        freeze_lora_after_hidden_state(parts.text_encoder, SDXL_TEXT_ENCODER_1_HIDDEN_STATE)
        trained["text_encoder_2"] = add_text_encoder_lora(parts.text_encoder_2, options)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(trained)
    if config.torch_compile:
        # in place: state-dict keys, unwrapping and the exports stay as they are
        trained["unet"].compile(backend=config.torch_compile_backend)
    return trained


def enable_gradient_checkpointing(trained: dict[str, torch.nn.Module]) -> None:
    """Recompute activations in backward, in the UNet and in the trained text encoders.

    transformers checkpoints a layer only in training mode (`gradient_checkpointing and
    self.training`) and load_sdxl leaves every model in eval(), so the text encoders are put in
    train() (the diffusers script does the same; CLIP's dropout probabilities are 0 in SDXL's
    configs, and LoRA dropout modules were already in training mode)."""
    trained["unet"].enable_gradient_checkpointing()
    for name in ("text_encoder", "text_encoder_2"):
        if name in trained:
            trained[name].activation_checkpointing_enable()
            trained[name].train()


def parameter_groups(config: TrainConfig, trained: dict[str, torch.nn.Module]) -> list[dict]:
    groups = []
    for name, model in trained.items():
        lr = config.learning_rate if name == "unet" else (config.text_encoder_lr or config.learning_rate)
        groups.append({"params": [p for p in model.parameters() if p.requires_grad], "lr": lr})
    return groups


def setup(config: TrainConfig) -> Run:
    preflight(config)
    subsets, instance_examples, mask_summary = load_instances(config)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, log_with=config.report_to,
                              project_dir=config.output_dir)
    check_launch(accelerator)
    if mask_summary:
        accelerator.print(mask_summary)
    parts = load_sdxl(resolve_model_path(config), config.pretrained_vae_model_name_or_path)
    freeze_precision(parts, DTYPES[config.mixed_precision], config.pretrained_vae_model_name_or_path is not None)
    for model in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2):
        model.to(accelerator.device)
    prepare_class_pools(config, subsets, parts, accelerator)
    instances, classes = build_streams(config, subsets, instance_examples)
    set_seed(config.seed)  # the LoRA init: the same on every rank and in a resumed run
    trained = attach_lora(config, parts)
    # Only LoRA dropout reads the global RNG: each rank its own masks; every rank's state is checkpointed.
    torch.manual_seed(derived_seed("dropout", config.seed, accelerator.process_index))
    optimizer = build_optimizer(config, parameter_groups(config, trained))
    total = count_total_steps(config, instances.samples_per_epoch(config.train_batch_size), accelerator.num_processes)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=total, num_cycles=config.lr_num_cycles, power=config.lr_power)
    flat = make_perturbation(config, trained, total, accelerator.process_index, log=accelerator.print)
    prepared = accelerator.prepare(*trained.values(), optimizer)
    trained = dict(zip(trained, prepared[:-1]))
    encoders = [trained["text_encoder"], trained["text_encoder_2"]] if config.train_text_encoder else None
    batches = BatchMaker(parts, config, accelerator.device, DTYPES[config.mixed_precision], encoders)
    run = Run(config, accelerator, parts, trained, flat, prepared[-1], lr_scheduler, batches, instances, classes,
              total, subsets=subsets)
    if config.ema_decay is not None:
        run.ema = Ema(unwrapped(run), decay=config.ema_decay)
    run.validation = build_validation_loss(config, parts, unwrapped(run), accelerator)
    run.guard = NonfiniteGuard(config.max_nonfinite_steps)
    maybe_resume(run)
    return run


def maybe_resume(run: Run) -> None:
    if run.config.resume_from_checkpoint is None:
        return
    folder = resolve_checkpoint(run.output_dir, run.config.resume_from_checkpoint, warn=run.accelerator.print)
    state = load_checkpoint(folder, unwrapped(run), run.optimizer, run.lr_scheduler,
                            rank=run.accelerator.process_index)
    saved_by = state.get("num_processes", 1)
    if saved_by != run.accelerator.num_processes:
        run.accelerator.print(f"warning: {folder} was saved by {saved_by} processes, resuming with "
                              f"{run.accelerator.num_processes}: training continues, but not exactly as it would have")
    if run.ema is not None:
        run.ema.load_state_dict(load_checkpoint_tensors(folder, "ema"))
    run.guard.load_state_dict(state.get("nonfinite", {}))
    run.start_step = state["step"]
    run.started_at = state.get("started_at", run.started_at)  # the run's start, not this session's
    if run.start_step > run.total_steps:
        raise UserError(f"{folder} is at step {run.start_step}, beyond --max_train_steps {run.total_steps}")
    run.accelerator.print(f"resumed from {folder} at step {run.start_step}")


def unwrapped(run: Run) -> dict[str, torch.nn.Module]:
    return {name: run.accelerator.unwrap_model(model) for name, model in run.trained.items()}


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


def checkpoint(run: Run, step: int) -> Path:
    folder = run.output_dir / f"checkpoint-{step}"
    rng_states = all_rng_states()  # LoRA and optimizer are the same on every rank, the dropout RNG is not
    if run.accelerator.is_main_process:
        save_checkpoint(run.output_dir, step, unwrapped(run), run.optimizer, run.lr_scheduler,
                        total_limit=run.config.checkpoints_total_limit, rng_states=rng_states,
                        extra={"num_processes": run.accelerator.num_processes, "started_at": run.started_at,
                               "nonfinite": run.guard.state_dict()},
                        tensors={"ema": run.ema.state_dict()} if run.ema is not None else None)
    run.accelerator.wait_for_everyone()
    return folder


def validate(run: Run, tag: str) -> list[Path]:
    cfg = run.config
    if not cfg.validation_prompt or not run.accelerator.is_main_process:
        return []
    models = unwrapped(run)
    pipe = pipeline_from_parts(run.parts, models["unet"], models.get("text_encoder", run.parts.text_encoder),
                               models.get("text_encoder_2", run.parts.text_encoder_2))
    with run.accelerator.autocast():
        return sample_images(pipe, cfg.validation_prompt, cfg.num_validation_images, cfg.seed,
                             cfg.validation_inference_steps, cfg.validation_guidance_scale, cfg.resolution,
                             run.output_dir / "samples", tag)


def finish(run: Run) -> None:
    """Final samples, both LoRA files, the model card: written by the main process only."""
    from flatlora_diffusion.lora.save import save_lora_files

    from .model_card import write_model_card

    run.accelerator.wait_for_everyone()
    if not run.accelerator.is_main_process:
        return
    models = unwrapped(run)
    options = run.config.lora_options()
    trained = (models["unet"], models.get("text_encoder"), models.get("text_encoder_2"))
    if run.ema is not None:  # raw weights beside, the EMA weights become the main files and samples
        save_lora_files(run.output_dir / "raw_weights", *trained, lora=options, metadata=training_metadata(run))
        run.ema.copy_to_modules()
    samples = validate(run, "final")
    save_lora_files(run.output_dir, *trained, lora=options, metadata=training_metadata(run))
    write_model_card(run.output_dir, run.config, shareable_model_name(resolve_model_path(run.config)), samples,
                     trigger_prompt(run))


def training_metadata(run: Run) -> dict[str, str]:
    """kohya/modelspec run metadata (export.training_metadata) plus the options of this trainer."""
    from flatlora_diffusion.lora.save import training_metadata as standard_run_metadata

    cfg = run.config
    meta = standard_run_metadata(
        steps=run.total_steps, learning_rate=cfg.learning_rate, resolution=cfg.resolution, seed=cfg.seed,
        sigma=cfg.flat_sigma, schedule=cfg.flat_schedule, flat_seed=cfg.noise_seed, started_at=run.started_at,
        title=Path(cfg.output_dir).name, base_model=shareable_model_name(resolve_model_path(cfg)))
    return {**meta, "ss_text_encoder_lr": str(cfg.text_encoder_lr or ""),
            "ss_min_snr_gamma": str(cfg.snr_gamma or ""), "ss_noise_offset": str(cfg.noise_offset),
            "ss_optimizer": "bitsandbytes.optim.AdamW8bit" if cfg.use_8bit_adam else cfg.optimizer,
            "ss_ema_decay": str(cfg.ema_decay or ""), "ss_enable_bucket": str(cfg.aspect_buckets),
            "ss_prediction_type": run.parts.noise_scheduler.config.prediction_type,
            "instance_prompt": trigger_prompt(run)}


def trigger_prompt(run: Run) -> str:
    """--instance_prompt, or the first subset's prompt (--dataset_config, kohya folders)."""
    return run.config.instance_prompt or run.subsets[0].images.prompt or ""


def resolved_config(run: Run) -> dict:
    values = run.config.to_dict()
    values.update(pretrained_model_name_or_path=resolve_model_path(run.config), total_steps=run.total_steps,
                  num_processes=run.accelerator.num_processes, flatlora_diffusion_version=__version__,
                  subsets=subsets_as_dicts(run.subsets))
    return values


def write_json(path: Path, values: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(values, indent=2, default=str))


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
