"""Names of SDXL LoRA modules across formats: diffusers paths, SGM paths and kohya keys.

Stability's SGM UNet (the naming kohya sd-scripts, ComfyUI and A1111 key SDXL LoRAs by) keeps
its blocks in three flat lists: `input_blocks` (conv_in, then per down block one entry per layer
and one for the downsampler), `middle_block` (resnet, attention, resnet) and `output_blocks`
(per up block one entry per layer, the upsampler inside the last one). In each entry the resnet
is child 0 and the transformer child 1. diffusers groups the same modules per block. The index
arithmetic below is derived from the UNet config, so it holds for any SDXL-layout UNet, not just
SDXL base. Inside a transformer both use the same names (`transformer_blocks.0.attn1.to_q`).

Canonical names (what our LoRA sets are keyed by): the diffusers path for the UNet, and for the
text encoders the path with the `text_model.` prefix, which transformers >= 5.6 dropped from
CLIPTextModel but ComfyUI and A1111 still expect (`lora_te1_text_model_encoder_layers_...`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
TEXT_MODEL = "text_model."

# diffusers ResnetBlock2D child -> SGM ResBlock child.
_RESNET_CHILDREN = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_LEVEL = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
              "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.+))?")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.+))?")


class LoraNameError(ValueError):
    """A module path or kohya key that does not name a module of the model."""


@dataclass(frozen=True)
class UnetLayout:
    """The block structure of a diffusers UNet2DConditionModel, as far as SGM numbering needs it."""

    down_layers: tuple[int, ...]  # resnets per down block
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]

    @classmethod
    def from_config(cls, config: Mapping) -> "UnetLayout":
        down_types, up_types = tuple(config["down_block_types"]), tuple(config["up_block_types"])
        layers = config["layers_per_block"]
        layers = (layers,) * len(down_types) if isinstance(layers, int) else tuple(layers)
        if not len(layers) == len(down_types) == len(up_types):
            raise LoraNameError("UNet config: layers_per_block, down_block_types and up_block_types differ in length")
        return cls(layers, tuple("CrossAttn" in t for t in down_types), tuple("CrossAttn" in t for t in up_types))

    @property
    def up_layers(self) -> tuple[int, ...]:
        return tuple(n + 1 for n in reversed(self.down_layers))  # up blocks take one extra skip layer

    def input_index(self, block: int, layer: int) -> int:
        # 1 for conv_in; every earlier down block contributes its layers plus its downsampler.
        return 1 + sum(self.down_layers[:block]) + block + layer

    def output_index(self, block: int, layer: int) -> int:
        return sum(self.up_layers[:block]) + layer


def _join(*parts: str | None) -> str:
    return ".".join(p for p in parts if p)


def _resnet_child(rest: str | None) -> str | None:
    if rest is None:
        return None
    head, _, tail = rest.partition(".")
    if head not in _RESNET_CHILDREN:
        raise LoraNameError(f"resnet child {head!r} has no SGM name")
    return _join(_RESNET_CHILDREN[head], tail)


def _block_to_sgm(kind: str, block: int, part: str, index: int, rest: str | None, layout: UnetLayout) -> str:
    if kind == "down_blocks":
        if part == "downsamplers":  # diffusers `downsamplers.0.conv` is SGM `op`
            return _join(f"input_blocks.{layout.input_index(block, layout.down_layers[block])}.0",
                         re.sub(r"^conv(?=\.|$)", "op", rest or ""))
        entry = f"input_blocks.{layout.input_index(block, index)}"
    else:
        if part == "upsamplers":  # the upsampler sits after the resnet (and transformer) of the last layer
            last = layout.output_index(block, layout.up_layers[block] - 1)
            return _join(f"output_blocks.{last}.{2 if layout.up_attention[block] else 1}", rest)
        entry = f"output_blocks.{layout.output_index(block, index)}"
    if part == "resnets":
        return _join(f"{entry}.0", _resnet_child(rest))
    return _join(f"{entry}.1", rest)


def sgm_name(path: str, layout: UnetLayout) -> str:
    """The SGM (original Stability) path of the diffusers UNet module `path`."""
    if path in _TOP_LEVEL:
        return _TOP_LEVEL[path]
    match = _BLOCK.fullmatch(path)
    if match:
        kind, block, part, index, rest = match.groups()
        return _block_to_sgm(kind, int(block), part, int(index), rest, layout)
    match = _MID.fullmatch(path)
    if match:
        part, index, rest = match.groups()
        if part == "attentions":
            return _join(f"middle_block.{int(index) + 1}", rest)
        return _join(f"middle_block.{2 * int(index)}", _resnet_child(rest))
    raise LoraNameError(f"UNet module {path!r} has no SGM name")


def canonical_name(component: str, path: str) -> str:
    """Our canonical name of the module at `path` in a live model of `component`."""
    if component == "unet" or path.startswith(TEXT_MODEL):
        return path
    return TEXT_MODEL + path


def live_name(component: str, canonical: str, model: torch.nn.Module) -> str:
    """The path of the module named `canonical` in `model` (with or without `text_model.`)."""
    if component == "unet" or hasattr(model, "text_model"):
        return canonical
    return canonical.removeprefix(TEXT_MODEL)


def kohya_module_name(component: str, canonical: str, layout: UnetLayout | None) -> str:
    """`lora_unet_input_blocks_4_1_...`: the kohya key stem (without `.lora_down.weight` etc.)."""
    path = sgm_name(canonical, layout) if component == "unet" else canonical
    return KOHYA_PREFIXES[component] + path.replace(".", "_")


def lora_capable_modules(model: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Module]]:
    """(path, module) of every Linear/Conv2d of `model`: the layers a kohya LoRA can patch.

    Modules already wrapped by PEFT are named by their own path, not their `base_layer` child.
    """
    for path, module in model.named_modules():
        if path.endswith(".base_layer") or ".lora_" in path:
            continue
        layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            yield path, layer


def kohya_lookup(component: str, model: torch.nn.Module, layout: UnetLayout | None) -> dict[str, str]:
    """{kohya key stem: canonical name} for every LoRA-capable module of `model`.

    UNet modules are listed under their SGM stem and, as other tools also write them, under
    their diffusers-block stem (`lora_unet_down_blocks_1_attentions_0_...`).
    """
    table = {}
    for path, _ in lora_capable_modules(model):
        canonical = canonical_name(component, path)
        table[kohya_module_name(component, canonical, layout)] = canonical
        if component == "unet":
            table[KOHYA_PREFIXES["unet"] + canonical.replace(".", "_")] = canonical
    return table
