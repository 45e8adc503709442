"""Optimizer choice: AdamW (default), bitsandbytes 8-bit AdamW, Prodigy; missing packages are user errors."""

from __future__ import annotations

import importlib.util

import torch

from flatlora_diffusion.errors import UserError

OPTIMIZERS = ("adamw", "prodigy")


def _require(package: str, purpose: str, install: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise UserError(f"{purpose} needs the '{package}' package, which is not installed (pip install {install})")


def check_optimizer_available(config) -> None:
    """Fail at start, before any model is loaded, when the chosen optimizer cannot run here."""
    if config.optimizer == "prodigy":
        _require("prodigyopt", "--optimizer prodigy", "prodigyopt")
    if config.use_8bit_adam:
        _require("bitsandbytes", "--use_8bit_adam", "bitsandbytes")
        if not torch.cuda.is_available():
            raise UserError("--use_8bit_adam needs a CUDA GPU (bitsandbytes' 8-bit AdamW has no CPU kernels)")


def build_optimizer(config, groups: list[dict]) -> torch.optim.Optimizer:
    """`groups`: parameter groups with their own learning rates (UNet, text encoders)."""
    check_optimizer_available(config)
    kwargs = dict(betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
                  eps=config.adam_epsilon)
    if config.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, **kwargs)
    if config.use_8bit_adam:
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)
