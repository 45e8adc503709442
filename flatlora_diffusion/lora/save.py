"""Write a trained LoRA as the two files every SDXL tool loads (see docs: LoRA file formats).

    paths = save_lora_files(output_dir, unet, text_encoder, text_encoder_2, lora=options,
                            metadata=training_metadata(steps=..., learning_rate=..., ...))

`paths["diffusers"]` is `pytorch_lora_weights.safetensors` (StableDiffusionXLPipeline.load_lora_weights),
`paths["kohya"]` is `pytorch_lora_weights_kohya.safetensors` (ComfyUI, A1111/Forge, kohya tools).
Both are written atomically and hold fp32 tensors by default (`dtype=torch.float16` halves
them). Only LoRA tensors are read, never a forward pass, so exporting inside or outside
`FlatLora.perturb` gives identical files: the weight noise never reaches them.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch

from flatlora_diffusion import __version__

from .attach import LoraOptions
from .formats import DIFFUSERS_FILE, KOHYA_FILE, to_diffusers, to_kohya, write_safetensors
from .kohya_names import UnetLayout
from .lora_set import LoraFileError, LoraSet, from_peft_model

RESERVED_METADATA = ("format", "lora_adapter_metadata")  # written by us for diffusers' loader


def lora_set_from_models(unet, text_encoder=None, text_encoder_2=None, adapter_name: str = "default") -> LoraSet:
    """The LoRA of adapter `adapter_name` in PEFT-injected SDXL models, as plain tensors."""
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    # torch.compile wraps a model as `_orig_mod`, which would otherwise prefix every module path.
    models = {c: getattr(m, "_orig_mod", m) for c, m in models.items() if m is not None}
    return LoraSet({c: from_peft_model(c, m, adapter_name) for c, m in models.items()})


def save_lora_files(output_dir: str | Path, unet, text_encoder=None, text_encoder_2=None, *,
                    lora: LoraOptions, metadata: dict[str, str] | None = None,
                    adapter_name: str = "default", dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """Write the diffusers and kohya LoRA files of the PEFT-injected models into `output_dir`.

    Args:
        lora: the options the LoRA was trained with; every module must have its rank and alpha
            (a mismatch means the models are not the ones trained, and raises LoraFileError).
        metadata: extra safetensors metadata (strings; ints/floats are written with str()),
            e.g. from `training_metadata`. Both files get it, after our kohya/modelspec defaults.
        dtype: dtype of the written LoRA tensors (kohya `.alpha` scalars stay fp32).

    Returns {"diffusers": Path, "kohya": Path}.
    """
    lora_set = lora_set_from_models(unet, text_encoder, text_encoder_2, adapter_name)
    if not lora_set.modules:
        raise LoraFileError(f"no LoRA adapter {adapter_name!r} found in the given models")
    _check_options(lora_set, lora)
    lora_set = lora_set.to(dtype)
    # checked after the cast (fp16 can overflow) and before either file is written: good files stay good
    lora_set.check_finite(f"the LoRA files in {output_dir} were not written")
    file_metadata = {**standard_metadata(lora_set), **_stringify(metadata or {})}
    tensors, diffusers_metadata = to_diffusers(lora_set)
    output_dir = Path(output_dir)
    paths = {
        "diffusers": write_safetensors(output_dir / DIFFUSERS_FILE, tensors, {**file_metadata, **diffusers_metadata}),
        "kohya": write_safetensors(output_dir / KOHYA_FILE, to_kohya(lora_set, UnetLayout.from_config(unet.config)),
                                   file_metadata),
    }
    return paths


def _check_options(lora_set: LoraSet, options: LoraOptions) -> None:
    for component, name, module in lora_set.items():
        rank, alpha = options.rank_and_alpha(module.spatial)
        if (module.rank, module.alpha) != (rank, alpha):
            raise LoraFileError(f"{component} {name}: rank {module.rank}, alpha {module.alpha} differ from "
                                f"the LoraOptions (rank {rank}, alpha {alpha})")


def _stringify(metadata: dict) -> dict[str, str]:
    out = {}
    for key, value in metadata.items():
        if key in RESERVED_METADATA:
            raise LoraFileError(f"metadata key {key!r} is reserved for the diffusers adapter config")
        if not isinstance(value, (str, int, float, bool)):
            raise LoraFileError(f"metadata {key!r}: value must be a string or number, got {type(value).__name__}")
        out[str(key)] = str(value)
    return out


def standard_metadata(lora_set: LoraSet) -> dict[str, str]:
    """kohya `ss_*` and `modelspec.*` keys that make A1111/ComfyUI/kohya tools treat the file as SDXL LoRA.

    ss_network_dim/alpha hold the most common rank/alpha of the Linear and 1x1 modules, and with
    conv LoRA ss_network_args the kxk convs' conv_dim/conv_alpha, as kohya writes them; each
    module's own alpha is in the file.
    """
    spatial = any(m.spatial for _, _, m in lora_set.items())
    rank, alpha = lora_set.typical(spatial=False if lora_set.has(spatial=False) else None)
    conv_args = {}
    if spatial:
        conv_rank, conv_alpha = lora_set.typical(spatial=True)
        conv_args = {"ss_network_args": json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_alpha))})}
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        **conv_args,
        "ss_base_model_version": "sdxl_base_v1-0",  # A1111 calls a LoRA SDXL only if this starts with sdxl_
        "ss_v2": "False",
        "ss_network_train_unet_only": str(lora_set.components() == ["unet"]),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": "flatlora-diffusion LoRA",
        "flatlora_diffusion_version": __version__,
    }


def _iso_date(unix_time: float) -> str:
    return datetime.datetime.fromtimestamp(unix_time, datetime.timezone.utc).isoformat(timespec="seconds")


def training_metadata(*, steps: int, learning_rate: float, resolution: int, seed: int, sigma: float,
                      schedule: str, flat_seed: int, started_at: float, title: str | None = None,
                      base_model: str | None = None) -> dict[str, str]:
    """The run-specific metadata a trainer should pass to `save_lora_files`.

    `started_at` is the run's start as a Unix time (kohya's ss_training_started_at); sigma,
    schedule and flat_seed are the FlatLora settings (flatlora_sigma/_schedule/_seed).
    """
    meta = {
        "ss_training_started_at": str(started_at), "ss_steps": str(steps),
        "ss_learning_rate": str(learning_rate), "ss_resolution": f"({resolution}, {resolution})",
        "ss_seed": str(seed), "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": _iso_date(started_at),
        "flatlora_sigma": str(sigma), "flatlora_schedule": schedule, "flatlora_seed": str(flat_seed),
    }
    if title is not None:
        meta["modelspec.title"] = title
    if base_model is not None:
        meta["ss_sd_model_name"] = base_model
    return meta
