"""The one validated configuration behind the CLI, the TOML config file and the app.

Flag names follow the diffusers DreamBooth LoRA SDXL script where the concept is the same.
Every field's `help` is the CLI help; `__post_init__` refuses impossible combinations, naming
the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from flatlora_diffusion.errors import UserError

FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without importing torch here
MAX_SEED = 2**32 - 1  # numpy's seed range (accelerate's set_seed seeds numpy too)
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # model and data
    pretrained_model_name_or_path: str | None = _f(
        None, "SDXL diffusers folder or hub id (default: the embedded tiny model)")
    pretrained_vae_model_name_or_path: str | None = _f(
        None, "an fp16-safe VAE (e.g. madebyollin/sdxl-vae-fp16-fix); keeps the VAE in the training precision")
    instance_data_dir: str | None = _f(None, "folder of instance images (a .txt beside an image overrides the prompt)")
    instance_prompt: str | None = _f(None, "prompt with the trigger token, e.g. 'a photo of sks dog'")
    caption_extension: str = _f(".txt", "extension of per-image caption files")
    repeats: int = _f(1, "how many times each instance image appears per epoch")
    class_data_dir: str | None = _f(None, "folder of class images (generated there when missing)")
    class_prompt: str | None = _f(None, "prompt of the class, e.g. 'a photo of a dog'")
    with_prior_preservation: bool = _f(False, "add the prior-preservation loss on class images")
    num_class_images: int = _f(100, "class images wanted; missing ones are generated before training")
    prior_loss_weight: float = _f(1.0, "weight of the prior-preservation loss")
    sample_batch_size: int = _f(4, "batch size when generating class images")
    resolution: int = _f(1024, "training resolution (multiple of 8)")
    center_crop: bool = _f(False, "center crop instead of a random crop")
    random_flip: bool = _f(False, "horizontal flip drawn per sample per epoch")
    dataset_config: str | None = _f(
        None, "TOML file of [[subsets]] (folder, prompt, repeats, class folder/prompt, weights) instead of the "
        "--instance_data_dir/--class_data_dir flags")
    masked_loss: bool = _f(False, "train only where a mask (name.mask.png or masks/name.*; white = train) says so")
    cache_latents_to_disk: str | None = _f(
        None, "folder of VAE latents reused across runs, keyed by image, size, crop, flip and VAE")
    caption_dropout_rate: float = _f(0.0, "probability of training a sample unconditioned (empty prompt = zeros)")
    shuffle_caption: bool = _f(False, "shuffle the comma-separated tags of each caption, per sample")
    keep_tokens: int = _f(0, "with --shuffle_caption: the first N tags stay in place (the trigger stays first)")
    # LoRA and Flat-LoRA
    rank: int = _f(4, "LoRA rank")
    lora_alpha: float | None = _f(None, "LoRA alpha, scale = alpha / rank (default: rank)")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    train_text_encoder: bool = _f(False, "also train LoRA on both text encoders")
    conv_rank: int | None = _f(None, "also LoRA on the UNet's 3x3 convolutions at this rank (kohya LoCon layout: "
                                     "resnet conv1/conv2, down/upsamplers; conv_shortcut and time_emb_proj at --rank)")
    conv_alpha: float | None = _f(None, "alpha of the conv LoRA, scale = conv_alpha / conv_rank (default: conv_rank)")
    flat_sigma: float = _f(0.1, "Flat-LoRA perturbation strength (paper: 0.1 for SDXL); 0 = plain LoRA")
    flat_schedule: str = _f("cosine", "sigma schedule", choices=("cosine", "constant"))
    flat_seed: int | None = _f(None, "seed of the Flat-LoRA noise (default: --seed)")
    flat_noise_buffer: bool = _f(
        False, "keep each perturbed layer's W + eps for the whole optimizer step: one noise draw per layer per "
               "step whatever the accumulation and checkpointing, for one weight copy per perturbed layer of "
               "memory (printed at start); the same results as without it")
    # optimisation
    train_batch_size: int = _f(1, "batch size per device")
    num_train_epochs: int = _f(1, "epochs, used when --max_train_steps is not given")
    max_train_steps: int | None = _f(None, "optimizer steps in total (overrides epochs)")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    gradient_checkpointing: bool = _f(False, "trade compute for memory in the UNet (and text encoders)")
    torch_compile: bool = _f(False, "compile the UNet with torch.compile; the first steps are slow")
    torch_compile_backend: str = _f("inductor", "torch.compile backend (inductor; aot_eager to debug)")
    learning_rate: float = _f(1e-4, "learning rate of the UNet LoRA")
    text_encoder_lr: float | None = _f(None, "learning rate of the text-encoder LoRA (default: --learning_rate)")
    lr_scheduler: str = _f("constant", "LR schedule", choices=SCHEDULERS)
    lr_warmup_steps: int = _f(0, "warm-up steps of the LR schedule")
    lr_num_cycles: int = _f(1, "cycles of cosine_with_restarts")
    lr_power: float = _f(1.0, "power of the polynomial schedule")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_weight_decay: float = _f(1e-4, "AdamW weight decay")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)")
    max_nonfinite_steps: int = _f(10, "stop after this many consecutive steps skipped for a NaN/inf loss or gradient")
    optimizer: str = _f("adamw", "optimizer (prodigy needs the prodigyopt package; use --learning_rate 1.0)",
                        choices=("adamw", "prodigy"))
    use_8bit_adam: bool = _f(False, "bitsandbytes 8-bit AdamW (CUDA only)")
    snr_gamma: float | None = _f(None, "Min-SNR weighting gamma (5.0 is the paper's value); off by default")
    noise_offset: float = _f(0.0, "std of the per-channel noise offset (e.g. 0.05); 0 = off")
    ema_decay: float | None = _f(None, "keep an EMA of the LoRA weights with this decay and export it as the main file")
    aspect_buckets: bool = _f(False, "aspect-ratio buckets of about resolution^2 pixels instead of square crops")
    mixed_precision: str = _f("no", "precision of the frozen base; LoRA stays fp32", choices=("no", "fp16", "bf16"))
    seed: int = _f(0, "seed of data order, augmentation, noise and timesteps")
    # outputs, validation, checkpoints
    output_dir: str = _f("outputs/flatlora-run", "where the LoRA files, samples, metrics and checkpoints go")
    validation_prompt: list[str] = _f((), "prompt for sample images (repeatable)", repeatable=True)
    num_validation_images: int = _f(2, "images per validation prompt")
    validation_steps: int | None = _f(None, "make samples every N optimizer steps (and always at the end)")
    validation_inference_steps: int = _f(25, "denoising steps of the sample images")
    validation_guidance_scale: float = _f(5.0, "guidance scale of the sample images")
    validation_loss_every: int | None = _f(
        None, "log a deterministic validation loss (fixed images, noise, timesteps) every N steps and at the end")
    validation_data_dir: str | None = _f(
        None, "held-out images for --validation_loss_every (default: the instance images)")
    checkpointing_steps: int = _f(500, "save a resumable checkpoint every N optimizer steps")
    checkpoints_total_limit: int | None = _f(None, "keep at most this many checkpoints")
    resume_from_checkpoint: str | None = _f(None, "'latest' or a checkpoint folder")
    report_to: str | None = _f(None, "accelerate tracker, e.g. tensorboard")

    def __post_init__(self):
        self.validation_prompt = list(self.validation_prompt or [])
        self._check_ranges()
        self._check_combinations()

    def _check_ranges(self):
        self._check_numbers()
        positive = ("repeats", "num_class_images", "sample_batch_size", "resolution", "rank", "train_batch_size",
                    "num_train_epochs", "gradient_accumulation_steps", "num_validation_images",
                    "validation_inference_steps", "checkpointing_steps", "max_nonfinite_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_steps", "validation_steps", "checkpoints_total_limit", "conv_rank",
                     "validation_loss_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.resolution % 8:
            raise UserError(f"--resolution must be a multiple of 8 (the VAE downsamples by 8), got {self.resolution}")
        if self.flat_sigma < 0:
            raise UserError(f"--flat_sigma must be >= 0, got {self.flat_sigma}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for name in ("lora_alpha", "conv_alpha"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"--{name} must be > 0, got {getattr(self, name)}")
        for name in ("learning_rate", "prior_loss_weight"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be > 0, got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"--{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")

    def _check_numbers(self):
        """Values the maths cannot hold: NaN/inf, beyond float32 (LoRA and optimizer state), seeds numpy refuses."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{f.name} must be a finite number, got {value}")
            if isinstance(value, float) and abs(value) > FLOAT32_MAX:
                raise UserError(f"--{f.name} {value:g} is beyond float32, the training dtype (max {FLOAT32_MAX:.4g})")
            if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
                raise UserError(f"--{f.name} {value} does not fit a 64-bit integer")
        for name in ("seed", "flat_seed"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) <= MAX_SEED:
                raise UserError(f"--{name} must be between 0 and {MAX_SEED}, got {getattr(self, name)}")

    def _check_combinations(self):
        self._check_dataset_flags()
        if self.class_data_dir and not self.class_prompt:
            raise UserError("--class_data_dir is given but --class_prompt is not: class images need their prompt")
        if self.with_prior_preservation and not (self.class_data_dir and self.class_prompt):
            raise UserError("--with_prior_preservation needs --class_data_dir and --class_prompt")
        if self.text_encoder_lr is not None and not self.train_text_encoder:
            raise UserError("--text_encoder_lr is set but --train_text_encoder is not")
        if self.use_8bit_adam and self.optimizer != "adamw":
            raise UserError("--use_8bit_adam is an AdamW variant; it cannot be combined with --optimizer prodigy")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise UserError(f"--ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise UserError(f"--snr_gamma must be > 0, got {self.snr_gamma}")
        if self.noise_offset < 0:
            raise UserError(f"--noise_offset must be >= 0, got {self.noise_offset}")
        if self.torch_compile_backend != "inductor" and not self.torch_compile:
            raise UserError("--torch_compile_backend is set but --torch_compile is not")
        if self.validation_steps is not None and not self.validation_prompt:
            raise UserError("--validation_steps is set but no --validation_prompt is given")
        if self.conv_alpha is not None and self.conv_rank is None:
            raise UserError("--conv_alpha is set but --conv_rank is not: conv LoRA is off without --conv_rank")
        if self.validation_data_dir and self.validation_loss_every is None:
            raise UserError("--validation_data_dir is set but --validation_loss_every is not")

    def _check_dataset_flags(self):
        """--dataset_config replaces the single-folder flags; the caption options need sane numbers."""
        if self.dataset_config is not None:
            given = [f"--{name}" for name in ("instance_data_dir", "instance_prompt", "class_data_dir", "class_prompt")
                     if getattr(self, name)]
            given += ["--with_prior_preservation"] * self.with_prior_preservation + ["--repeats"] * (self.repeats != 1)
            if given:
                raise UserError("--dataset_config describes every folder; it cannot be combined with "
                                f"{', '.join(given)} (put them in the TOML file's [[subsets]])")
        elif not self.instance_data_dir:
            raise UserError("--instance_data_dir (or --dataset_config) is required")
        if not 0 <= self.caption_dropout_rate < 1:
            raise UserError(f"--caption_dropout_rate must be in [0, 1), got {self.caption_dropout_rate}")
        if self.keep_tokens < 0:
            raise UserError(f"--keep_tokens must be >= 0, got {self.keep_tokens}")
        if self.keep_tokens and not self.shuffle_caption:
            raise UserError("--keep_tokens only applies with --shuffle_caption")

    # derived values
    @property
    def alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.rank)

    @property
    def noise_seed(self) -> int:
        return self.seed if self.flat_seed is None else self.flat_seed

    def lora_options(self):
        """The LoraOptions of the run's adapters (lora/ is imported here only: parsing flags stays light)."""
        from flatlora_diffusion.lora.attach import LoraOptions

        return LoraOptions(rank=self.rank, alpha=self.alpha, dropout=self.lora_dropout, conv_rank=self.conv_rank,
                           conv_alpha=self.conv_alpha)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------ CLI and TOML

def _field_type(f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(TrainConfig)[f.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None -> X
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train_dreambooth_flat.py",
                                     description="DreamBooth LoRA for SDXL with Flat-LoRA.",
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="TOML file setting any flag (command line wins)")
    for f in dataclasses.fields(TrainConfig):
        kind = _field_type(f)
        flag = f"--{f.name}"
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        elif f.metadata.get("repeatable"):
            parser.add_argument(flag, action="append", help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=kind, choices=f.metadata.get("choices"), help=f.metadata["help"])
    return parser


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid TOML ({err})") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    if isinstance(data.get("validation_prompt"), str):
        data["validation_prompt"] = [data["validation_prompt"]]
    return {name: _checked_value(path, name, value) for name, value in data.items()}


def _checked_value(path: Path, name: str, value):
    kind = _field_type(next(f for f in dataclasses.fields(TrainConfig) if f.name == name))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise UserError(f"{path}: {name} must be {kind.__name__}, got {value!r}")
    return value






def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Build the config from an optional TOML file, then the command line on top of it."""
    parser = build_parser()
    cli = vars(parser.parse_args(argv))
    values = load_toml(cli.pop("config")) if "config" in cli else {}
    values.update(cli)
    return TrainConfig(**values)
