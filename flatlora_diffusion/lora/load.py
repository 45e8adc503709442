"""Load an SDXL LoRA file (ours or another tool's) into our models as a PEFT adapter.

    load_lora_file("pytorch_lora_weights_kohya.safetensors", unet, text_encoder, text_encoder_2,
                   trainable=True)        # continue training: fp32 LoRA parameters, base frozen

Reads the diffusers/PEFT format and kohya format (SGM or diffusers-block UNet names, with or
without `.alpha`), attaches a LoRA with each module's own rank and alpha, and loads the
weights, so the models compute W + (alpha / rank)·up·down exactly as the file means.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from peft import set_peft_model_state_dict

from .formats import load_lora_set
from .lora_set import LoraFileError, LoraSet, ModuleLora, peft_config, resolve_modules


def load_lora_file(path: str | Path, unet, text_encoder=None, text_encoder_2=None, *,
                   adapter_name: str = "default", trainable: bool = False) -> LoraSet:
    """Attach the LoRA of file `path` to the given models as PEFT adapter `adapter_name`.

    trainable=True freezes the base weights and makes the LoRA parameters fp32 and trainable
    (as lora.add_lora does); otherwise LoRA parameters are frozen. A file with text-encoder
    modules needs the text encoders passed. Returns the LoraSet that was loaded.
    Raises LoraFileError (a ValueError) for a file that is not an SDXL LoRA of these models.
    """
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    models = {c: m for c, m in models.items() if m is not None}
    lora_set, _ = load_lora_set(path, models)
    attach_lora_set(lora_set, models, adapter_name=adapter_name, trainable=trainable)
    return lora_set


def load_lora_into_pipeline(pipe, path: str | Path, *, adapter_name: str = "default",
                            trainable: bool = False) -> LoraSet:
    """`load_lora_file` on a StableDiffusionXLPipeline's UNet and text encoders."""
    return load_lora_file(path, pipe.unet, pipe.text_encoder, pipe.text_encoder_2,
                          adapter_name=adapter_name, trainable=trainable)


def attach_lora_set(lora_set: LoraSet, models: dict[str, torch.nn.Module], *,
                    adapter_name: str = "default", trainable: bool = False) -> None:
    """Attach `lora_set` to `models` ({component: model}) as PEFT adapter `adapter_name`."""
    resolved = resolve_modules(lora_set, models)
    for component, names in resolved.items():
        model = models[component]
        if adapter_name in (getattr(model, "peft_config", None) or {}):
            raise LoraFileError(f"{component} already has an adapter named {adapter_name!r}")
        loras = {path: lora_set.modules[component][name] for name, path in names.items()}
        _attach(model, loras, adapter_name, trainable)


def _attach(model: torch.nn.Module, loras: dict[str, ModuleLora], adapter_name: str, trainable: bool) -> None:
    if trainable:
        model.requires_grad_(False)
    # PEFT initialises the new LoRA weights randomly before we overwrite them: keep that draw off
    # the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # Several adapters on one model is what inference.apply_loras wants; PEFT warns about it.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        model.add_adapter(peft_config(loras), adapter_name=adapter_name)
    params = _adapter_parameters(model, adapter_name)
    for param in params:
        if trainable:  # fp32 LoRA parameters, as lora.add_lora keeps them for mixed precision
            param.data = param.data.float()
        param.requires_grad_(trainable)
    state = {}
    for path, lora in loras.items():
        state[f"{path}.lora_A.weight"] = lora.down
        state[f"{path}.lora_B.weight"] = lora.up
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    missing = [k for k in getattr(result, "missing_keys", []) if f".{adapter_name}." in k and "lora_" in k]
    if unexpected or missing or len(params) != 2 * len(loras):
        raise LoraFileError(f"adapter {adapter_name!r} did not load exactly: "
                            f"unexpected {unexpected[:3]}, missing {missing[:3]}")


def _adapter_parameters(model: torch.nn.Module, adapter_name: str) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters()
            if f".lora_A.{adapter_name}." in n or f".lora_B.{adapter_name}." in n]
