"""Resumable checkpoints: LoRA tensors, optimizer, LR schedule, global RNG and the step.

Data order, augmentation, diffusion noise and Flat-LoRA noise are all derived from
(seed, step, rank), so these few files are everything an exact resume needs. Under N processes
the main process writes one checkpoint: the LoRA and optimizer state are identical on every rank
(DDP all-reduces the gradients), the global RNG (LoRA dropout) is not, so every rank's RNG state
is stored as `rng_rank<r>.pt` and each rank restores its own.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flatlora_diffusion.atomic import atomic_directory
from flatlora_diffusion.errors import UserError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def trainable_state(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{label}.{name}": p.detach().cpu().contiguous()
            for label, model in models.items() for name, p in model.named_parameters() if p.requires_grad}


def list_checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def rng_state() -> dict:
    """This process's global RNG state (read by LoRA dropout only)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def save_checkpoint(output_dir: Path, step: int, models, optimizer, lr_scheduler, extra: dict | None = None,
                    total_limit: int | None = None, tensors: dict[str, dict[str, torch.Tensor]] | None = None,
                    rng_states: list[dict] | None = None) -> Path:
    """Write checkpoint-<step> atomically, then prune the oldest beyond `total_limit`.

    `rng_states`: every process's `rng_state()` in rank order (default: this process's only).

    `tensors`: further named tensor sets (e.g. the EMA weights), saved as `<name>.safetensors`.
    """
    folder = Path(output_dir) / f"checkpoint-{step}"
    with atomic_directory(folder) as tmp:
        save_file(trainable_state(models), tmp / "lora_params.safetensors")
        for name, values in (tensors or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in values.items()}, tmp / f"{name}.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        for rank, state in enumerate(rng_states or [rng_state()]):
            torch.save(state, tmp / f"rng_rank{rank}.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=2))
    if total_limit:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old)
    return folder


def resolve_checkpoint(output_dir: Path, which: str) -> Path:
    if which == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise UserError(f"--resume_from_checkpoint latest: no checkpoint-* folder in {output_dir}")
        return found[-1]
    folder = Path(which)
    if not folder.is_absolute() and not folder.exists():
        folder = Path(output_dir) / which
    if not (folder / "state.json").is_file():
        raise UserError(f"not a checkpoint folder: {which}")
    return folder


def load_checkpoint(folder: Path, models, optimizer, lr_scheduler, rank: int = 0) -> dict:
    """Restore everything saved by `save_checkpoint`; returns state.json's content.

    Process `rank` restores its own RNG state; one the checkpoint lacks (saved by fewer
    processes) leaves the RNG as it is, and the caller says the resume is not exact.
    """
    params = load_file(folder / "lora_params.safetensors")
    current = {f"{label}.{name}": p for label, model in models.items()
               for name, p in model.named_parameters() if p.requires_grad}
    if params.keys() != current.keys():
        raise UserError(f"{folder} was saved with other LoRA settings (rank, targets or text encoders differ)")
    with torch.no_grad():
        for name, tensor in params.items():
            current[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(folder / "lr_scheduler.pt", weights_only=True))
    rng_file = folder / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((folder / "state.json").read_text())


def load_checkpoint_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    path = Path(folder) / f"{name}.safetensors"
    if not path.is_file():
        raise UserError(f"{folder} has no {name} state (was it saved without that option?)")
    return load_file(path)
