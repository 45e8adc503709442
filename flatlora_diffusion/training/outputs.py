"""What a run leaves behind: checkpoints, validation samples, both LoRA files, the model card, config.json."""

from __future__ import annotations

import json
from pathlib import Path

from flatlora_diffusion import __version__
from flatlora_diffusion.atomic import atomic_file
from flatlora_diffusion.data.dataset_config import subsets_as_dicts
from flatlora_diffusion.sdxl.models import shareable_model_name
from flatlora_diffusion.sdxl.sampling import pipeline_from_parts, sample_images

from .checkpoint import save_checkpoint
from .multiprocess import all_rng_states
from .run import Run, resolve_model_path, unwrapped


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
