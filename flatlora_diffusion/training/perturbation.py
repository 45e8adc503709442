"""The weight perturbation of a run: FlatLora, or nothing at all with --flat_sigma 0 (plain LoRA)."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from flatlora_diffusion.errors import UserError
from flatlora_diffusion.flat.flat_lora import FlatLora, FlatLoraError


class NoPerturbation:
    """Plain LoRA: the part of FlatLora's interface the loop uses, changing nothing.

    With sigma 0 FlatLora would not touch a weight either; not building it keeps plain LoRA free of
    any Flat-LoRA bookkeeping (row norms, draw counters) and lets layers FlatLora refuses (DoRA)
    train as plain LoRA.
    """

    sigma = 0.0

    def perturb(self, step: int) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def sigma_at(self, step: int) -> float:
        return 0.0


def make_perturbation(config, trained: dict[str, torch.nn.Module], total_steps: int, rank: int,
                      log: Callable[[str], None] = print) -> FlatLora | NoPerturbation:
    """FlatLora over the trained models; a layer it cannot perturb is one error line naming it."""
    if config.flat_sigma == 0:
        return NoPerturbation()
    try:
        flat = FlatLora(trained, sigma=config.flat_sigma, schedule=config.flat_schedule, total_steps=total_steps,
                        seed=config.noise_seed, rank=rank, noise_buffer=config.flat_noise_buffer)
    except FlatLoraError as error:
        raise UserError(f"--flat_sigma {config.flat_sigma}: {error} (--flat_sigma 0 trains plain LoRA)") from None
    if config.flat_noise_buffer:
        log(f"Flat-LoRA noise buffer: {flat.noise_buffer_bytes() / 1e9:.2f} GB "
            "(one W+eps per perturbed layer, kept for the optimizer step)")
    return flat
