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

from flatlora_diffusion.atomic import atomic_directory, remove_directory
from flatlora_diffusion.errors import UserError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "state.json"
MANIFEST_KEY = "files"  # {file name: size in bytes} of everything saved before state.json
REQUIRED_FILES = ("lora_params.safetensors", "optimizer.pt", "lr_scheduler.pt")


def trainable_state(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{label}.{name}": p.detach().cpu().contiguous()
            for label, model in models.items() for name, p in model.named_parameters() if p.requires_grad}


def list_checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding NaN or inf (None when all are finite)."""
    return next((name for name, t in tensors.items() if not torch.isfinite(t).all()), None)


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
    remove_stale_temporaries(output_dir)
    params = trainable_state(models)
    bad = first_nonfinite(params)
    if bad is not None:  # never let NaN weights push a good checkpoint out of total_limit
        kept = list_complete_checkpoints(output_dir)
        raise UserError(f"not saving {folder.name}: LoRA weight {bad} is NaN/inf; "
                        + (f"the last good checkpoint is {kept[-1]}" if kept else "no good checkpoint was saved"))
    with atomic_directory(folder) as tmp:
        save_file(params, tmp / "lora_params.safetensors")
        for name, values in (tensors or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in values.items()}, tmp / f"{name}.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        for rank, state in enumerate(rng_states or [rng_state()]):
            torch.save(state, tmp / f"rng_rank{rank}.pt")
        # state.json last, with the size of every file: the marker that the checkpoint is complete
        manifest = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **(extra or {}), MANIFEST_KEY: manifest}, indent=2))
    if total_limit:
        for old in list_complete_checkpoints(output_dir)[:-total_limit]:
            remove_directory(old)  # renamed away first: never seen half-deleted
    return folder


def remove_stale_temporaries(output_dir: Path) -> None:
    """Delete the temporary folders a killed save left behind (hidden, never read)."""
    for stale in Path(output_dir).glob(".checkpoint-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def missing_parts(folder: Path) -> list[str]:
    """What keeps `folder` from being a complete checkpoint (empty when it is one)."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return [STATE_FILE]
    manifest = state.get(MANIFEST_KEY) or {name: None for name in REQUIRED_FILES}  # saved before manifests
    return [name for name, size in manifest.items()
            if not (folder / name).is_file() or size not in (None, (folder / name).stat().st_size)]


def list_complete_checkpoints(output_dir: Path) -> list[Path]:
    return [folder for folder in list_checkpoints(output_dir) if not missing_parts(folder)]


def resolve_checkpoint(output_dir: Path, which: str, warn=print) -> Path:
    """The checkpoint folder to resume from; `latest` is the newest complete one.

    An incomplete one (a process killed while deleting it, a partial copy) is skipped with a warning.
    """
    if which == "latest":
        for folder in reversed(list_checkpoints(output_dir)):
            missing = missing_parts(folder)
            if not missing:
                return folder
            warn(f"warning: skipping incomplete checkpoint {folder} (missing or cut short: {', '.join(missing)})")
        raise UserError(f"--resume_from_checkpoint latest: no complete checkpoint-* folder in {output_dir}")
    folder = Path(which)
    if not folder.is_absolute() and not folder.exists():
        folder = Path(output_dir) / which
    if not (folder / STATE_FILE).is_file():
        raise UserError(f"not a checkpoint folder: {which}")
    missing = missing_parts(folder)
    if missing:
        raise UserError(f"{folder} is an incomplete checkpoint (missing or cut short: {', '.join(missing)})")
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
    return json.loads((folder / STATE_FILE).read_text())


def load_checkpoint_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    path = Path(folder) / f"{name}.safetensors"
    if not path.is_file():
        raise UserError(f"{folder} has no {name} state (was it saved without that option?)")
    return load_file(path)
