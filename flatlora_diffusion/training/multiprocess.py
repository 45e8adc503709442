"""What training under N processes (accelerate, DDP) needs beyond the one-process loop.

A launch check (N processes that each believe they are alone would all write the outputs), a
stop request that reaches every rank, every rank's RNG state for the checkpoint, and a
test-only dump of each rank's final state.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import save_file

from flatlora_diffusion.errors import UserError
from flatlora_diffusion.flat.flat_lora import FlatLora, find_lora_layers

from .checkpoint import rng_state, trainable_state

# Tests only: every rank writes rank<r>.safetensors there at the end of training (see dump_rank_state).
DEBUG_DUMP_ENV = "FLATLORA_DEBUG_DUMP_DIR"


def check_launch(accelerator: Accelerator) -> None:
    """Refuse N launched processes that accelerate does not join into one run.

    `torchrun --nproc_per_node N` on a machine without GPUs starts N processes that accelerate
    treats as N separate single-process runs unless ACCELERATE_USE_CPU is set.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise UserError(f"{launched} processes were launched (WORLD_SIZE) but accelerate joined "
                        f"{accelerator.num_processes}; to train on CPUs with gloo set ACCELERATE_USE_CPU=1")


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (a signal may reach one rank only)."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum").item() > 0


def all_rng_states() -> list[dict]:
    """Every rank's global RNG state, in rank order (a collective: call it on every rank)."""
    return gather_object([rng_state()])


def dump_rank_state(models: dict[str, torch.nn.Module], flat: FlatLora, step: int, rank: int) -> Path | None:
    """If $FLATLORA_DEBUG_DUMP_DIR is set, write this rank's trainable LoRA tensors and its Flat-LoRA noise.

    The noise is measured, not recomputed: the first LoRA layer's base Linear is run on the
    identity inside `flat.perturb(step)` and outside it; the difference is eps^T of this rank.
    """
    folder = os.environ.get(DEBUG_DUMP_ENV)
    if not folder:
        return None
    tensors = trainable_state(models)
    name, layer = find_lora_layers(models)[0]
    base = layer.get_base_layer()
    probe = torch.eye(base.in_features, device=base.weight.device, dtype=base.weight.dtype)
    with torch.no_grad():
        clean = base(probe)
        with flat.perturb(step):
            noisy = base(probe)
    tensors[f"flat_noise.{name}"] = (noisy - clean).float().cpu().contiguous()
    path = Path(folder) / f"rank{rank}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path)
    return path
