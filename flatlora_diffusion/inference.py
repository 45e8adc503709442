"""Generate with an SDXL base and any number of LoRA files (for the app and training validation).

    pipe = load_base("models/tiny-sdxl")                       # or a hub id
    apply_loras(pipe, [("run1/pytorch_lora_weights_kohya.safetensors", 0.8)])
    image = generate(pipe, "a photo of sks dog", seed=0)
    base, lora = generate_base_and_lora(pipe, [(path, 1.0)], "a photo of sks dog", seed=0)

The base is loaded once. Each LoRA file is attached once as its own PEFT adapter (named after
the file's path, size and modification time, so an overwritten file is loaded afresh), and
switching files or scales only changes which adapters are active and their scales: the base
weights are never touched or reloaded. Both LoRA formats load through lora_import, so files
from kohya, ComfyUI-style trainers and diffusers behave the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.loaders.lora_base import set_adapters_for_text_encoder
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from .lora.formats import read_lora_metadata
from .lora.kohya_names import COMPONENTS
from .lora.load import load_lora_into_pipeline
from .lora.lora_set import LoraFileError

__all__ = ["load_base", "apply_loras", "active_loras", "generate", "generate_base_and_lora",
           "lora_disabled", "read_lora_metadata", "adapter_name_for", "GenerationTimeout"]


def load_base(model: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
              progress: bool = False) -> StableDiffusionXLPipeline:
    """Load an SDXL pipeline from a local diffusers folder or a hub id."""
    pipe = StableDiffusionXLPipeline.from_pretrained(str(model), dtype=dtype)
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe


def adapter_name_for(path: str | Path) -> str:
    """A stable adapter name for the file's current contents (path, size, modification time)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise LoraFileError(f"{path}: no such file")
    stat = path.stat()
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    return "lora_" + hashlib.blake2b(key.encode(), digest_size=6).hexdigest()


def _loaded_adapters(pipe) -> set[str]:
    return {name for component in COMPONENTS
            for name in (getattr(getattr(pipe, component, None), "peft_config", None) or {})}


def apply_loras(pipe, loras: Sequence[tuple[str | Path, float]]) -> list[str]:
    """Make exactly `loras` ([(file, scale), ...]) active on `pipe`; an empty list means the base.

    Files not seen before are loaded (once); the others are switched off, not unloaded.
    Returns the adapter names in the order given. Raises LoraFileError for a bad file.
    """
    names = []
    for path, _ in loras:
        name = adapter_name_for(path)
        if name not in _loaded_adapters(pipe):
            load_lora_into_pipeline(pipe, path, adapter_name=name)
        names.append(name)
    _activate(pipe, dict(zip(names, (float(scale) for _, scale in loras))))
    return names


def _activate(pipe, scales: dict[str, float]) -> None:
    # Per component, since a LoRA may hold no text-encoder modules: diffusers' pipeline-level
    # set_adapters raises for an adapter a component lacks.
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        adapters = getattr(model, "peft_config", None) or {}
        if not adapters:
            continue
        names = [name for name in scales if name in adapters]
        if names and component == "unet":
            model.set_adapters(names, [scales[name] for name in names])
        elif names:
            set_adapters_for_text_encoder(names, model, [scales[name] for name in names])
        for layer in _tuner_layers(model):
            layer.enable_adapters(bool(names))


def _tuner_layers(model) -> list[BaseTunerLayer]:
    return [] if model is None else [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def active_loras(pipe) -> dict[str, float]:
    """{adapter name: scale} of the UNet adapters now active (empty when LoRA is off)."""
    for module in pipe.unet.modules():
        if isinstance(module, LoraLayer):
            if module.disable_adapters:
                return {}
            return {name: module.scaling[name] * module.r[name] / module.lora_alpha[name]
                    for name in module.active_adapters if name in module.scaling}
    return {}


@contextlib.contextmanager
def lora_disabled(pipe) -> Iterator[None]:
    """Generate with the base model inside the block; the previous LoRA selection comes back after."""
    before = {c: _layer_states(getattr(pipe, c, None)) for c in COMPONENTS}
    try:
        _activate(pipe, {})
        yield
    finally:
        for component, states in before.items():
            _restore_layer_states(getattr(pipe, component, None), states)


def _layer_states(model) -> tuple[list[tuple[BaseTunerLayer, bool]], list[tuple[torch.nn.Parameter, bool]]]:
    # PEFT's enable/disable also flips requires_grad of the adapters: restore both exactly, so a
    # validation run in the middle of training leaves the trainable set as it was.
    layers = _tuner_layers(model)
    params = [(p, p.requires_grad) for layer in layers for n, p in layer.named_parameters() if "lora_" in n]
    return [(layer, layer.disable_adapters) for layer in layers], params


def _restore_layer_states(model, states) -> None:
    layers, params = states
    for layer, disabled in layers:
        layer.enable_adapters(not disabled)
    for param, requires_grad in params:
        param.requires_grad_(requires_grad)


class GenerationTimeout(ValueError):
    """A generation ran far past its expected time and was cancelled (a user-facing message)."""


class _Deadline:
    """callback_on_step_end that interrupts the pipeline once `limit_s` seconds have passed."""

    def __init__(self, limit_s: float):
        self.limit_s, self.started, self.expired = limit_s, time.monotonic(), False

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if time.monotonic() - self.started > self.limit_s:
            self.expired = True
            pipe._interrupt = True  # diffusers' own cancel flag: the remaining steps are skipped
        return callback_kwargs


@torch.no_grad()
def generate(pipe, prompt: str, seed: int, negative_prompt: str | None = None, steps: int = 30,
             guidance: float = 5.0, width: int = 1024, height: int = 1024, time_limit_s: float | None = None):
    """One image (PIL) from `prompt`; the same seed and settings give the same image.

    The initial noise comes from a CPU generator, so a seed means the same noise on any device.
    With `time_limit_s`, a generation still running after that long is cancelled between two
    denoising steps and raises GenerationTimeout.
    """
    generator = torch.Generator("cpu").manual_seed(int(seed))
    deadline = _Deadline(time_limit_s) if time_limit_s is not None else None
    result = pipe(prompt=prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                  guidance_scale=guidance, width=width, height=height, generator=generator,
                  callback_on_step_end=deadline)
    if deadline is not None and deadline.expired:
        raise GenerationTimeout(f"generation cancelled after {time.monotonic() - deadline.started:.0f} s, far past "
                                f"its expected time (limit {deadline.limit_s:.0f} s); the app is free again")
    return result.images[0]


def generate_base_and_lora(pipe, loras: Sequence[tuple[str | Path, float]], prompt: str, seed: int, **settings):
    """(base image, LoRA image) with the same seed and settings: the LoRA's effect, side by side.

    `settings` are generate()'s (negative_prompt, steps, guidance, width, height). Leaves `loras` active.
    """
    apply_loras(pipe, loras)
    with lora_disabled(pipe):
        base = generate(pipe, prompt, seed, **settings)
    return base, generate(pipe, prompt, seed, **settings)
