"""VAE latents on disk (`--cache_latents_to_disk DIR`), reused across runs and resumes.

One safetensors file per (image content, target size, cover-resize size, crop, flip, VAE): every
(crop, flip) variant a run actually draws gets its own entry, so random crops and buckets are
cached too (and a run with the same seed draws the same variants again). The VAE's identity is a
hash of its config and weights (in the precision it runs in), computed once per run. An entry
holds the latent distribution's mean and std (float32), so training still samples fresh latents
each step. Entries are written atomically; one that cannot be read, or whose recorded key, shape
or values do not match, is recomputed and rewritten, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flatlora_diffusion.atomic import atomic_file
from flatlora_diffusion.errors import UserError

FORMAT = "flatlora-latents-1"  # bump when the pixels fed to the VAE change (resize filter, normalisation)


def check_cache_folder(folder: str | Path) -> None:
    """Refuse, before anything is loaded, a cache folder that is a file or cannot be written."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"--cache_latents_to_disk {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--cache_latents_to_disk {folder}: {existing} is not writable")


def vae_identity(vae: torch.nn.Module) -> str:
    """A hash of the VAE's config and every weight (name, dtype, shape, bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.view(torch.uint8).numpy())  # the buffer itself, no copy
    return digest.hexdigest()


class DiskLatentCache:
    def __init__(self, folder: str | Path, vae: torch.nn.Module):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.vae_id = vae_identity(vae)
        self._image_hashes: dict[Path, str] = {}

    def key(self, image: Path, size: tuple[int, int], plan) -> dict[str, str]:
        """Everything the latents depend on; `plan` is the image's CropPlan."""
        return {"format": FORMAT, "image": self._content_hash(image), "target": f"{size[0]}x{size[1]}",
                "resized": f"{plan.resized[0]}x{plan.resized[1]}", "crop": f"{plan.top},{plan.left}",
                "flip": str(plan.flipped), "vae": self.vae_id}

    def path(self, key: dict[str, str]) -> Path:
        name = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=20).hexdigest()
        return self.folder / name[:2] / f"{name}.safetensors"

    def load(self, key: dict[str, str], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, std) of a valid entry, or None: missing, unreadable, stale or malformed."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(path, "pt") as entry:
                if (entry.metadata() or {}).get("key") != json.dumps(key, sort_keys=True):
                    return None  # another image, size, crop or VAE under this name: stale
                if set(entry.keys()) != {"mean", "std"}:
                    return None
                mean, std = entry.get_tensor("mean"), entry.get_tensor("std")
        except (SafetensorError, OSError, ValueError, RuntimeError):
            return None
        if any(t.shape != shape or t.dtype != torch.float32 or not torch.isfinite(t).all() for t in (mean, std)):
            return None
        return mean, std

    def save(self, key: dict[str, str], mean: torch.Tensor, std: torch.Tensor) -> None:
        tensors = {"mean": mean.detach().float().cpu().contiguous(), "std": std.detach().float().cpu().contiguous()}
        with atomic_file(self.path(key)) as tmp:
            save_file(tensors, str(tmp), metadata={"key": json.dumps(key, sort_keys=True)})

    def _content_hash(self, image: Path) -> str:
        if image not in self._image_hashes:
            self._image_hashes[image] = hashlib.sha256(image.read_bytes()).hexdigest()
        return self._image_hashes[image]
