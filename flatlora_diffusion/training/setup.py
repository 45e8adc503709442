"""Setting a run up: the model, the LoRA, the data, the optimizer and Flat-LoRA, or a checkpoint to resume."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler

from flatlora_diffusion.data.batches import BatchMaker
from flatlora_diffusion.data.examples import derived_seed
from flatlora_diffusion.errors import UserError
from flatlora_diffusion.lora.attach import (
    add_text_encoder_lora,
    add_unet_lora,
    freeze_lora_after_hidden_state,
)
from flatlora_diffusion.sdxl.models import SDXLParts, freeze_precision, load_sdxl

from .checkpoint import load_checkpoint, load_checkpoint_tensors, resolve_checkpoint
from .config import TrainConfig
from .data_setup import build_streams, load_instances, prepare_class_pools
from .ema import Ema
from .multiprocess import check_launch
from .nonfinite import NonfiniteGuard
from .optimizers import build_optimizer
from .perturbation import make_perturbation
from .preflight import preflight
from .run import DTYPES, Run, resolve_model_path, unwrapped
from .validation_loss import build_validation_loss

SDXL_TEXT_ENCODER_1_HIDDEN_STATE = -2  # the hidden state conditioning.encode_prompts reads from text encoder 1


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
