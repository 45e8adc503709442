"""Which UNet modules conv LoRA ("LoCon") adds, in kohya sd-scripts' layout.

kohya's `networks/lora.py` (`conv_dim`/`conv_alpha`) adds LoRA to every Linear and Conv2d inside
the UNet's `ResnetBlock2D`, `Downsample2D` and `Upsample2D` blocks
(`UNET_TARGET_REPLACE_MODULE_CONV2D_3X3`): the 3x3 convolutions (resnet conv1/conv2, the
downsampler and upsampler convs) at the conv rank and alpha, and the 1x1 `conv_shortcut` and the
`time_emb_proj` Linear at the linear rank and alpha. We follow that layout exactly, so a file
trained here holds the same modules (and SGM key names) as a kohya LoCon of SDXL; conv_in and
conv_out are outside those blocks and stay untouched, as in kohya.

On SDXL base this is 38 3x3 convs (17 conv1, 17 conv2, 2 downsamplers, 2 upsamplers), 11
conv_shortcut and 17 time_emb_proj: 66 modules beside the attention projections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

CONV_BLOCKS = (ResnetBlock2D, Downsample2D, Upsample2D)


@dataclass(frozen=True)
class LoconTargets:
    """Full module paths inside the UNet's conv blocks, split by the rank kohya gives them."""

    spatial: tuple[str, ...]  # kxk convs (k > 1): conv rank and alpha
    linear: tuple[str, ...]   # Linear and 1x1 convs: the linear rank and alpha


def is_spatial(layer: torch.nn.Module) -> bool:
    """A convolution with a kernel larger than 1x1 (kohya's `conv_dim` applies to these)."""
    return isinstance(layer, torch.nn.Conv2d) and tuple(layer.kernel_size) != (1, 1)


def locon_targets(unet: torch.nn.Module) -> LoconTargets:
    """The LoCon modules of `unet` (a diffusers UNet2DConditionModel without LoRA yet)."""
    spatial, linear = [], []
    for block_path, block in unet.named_modules():
        if not isinstance(block, CONV_BLOCKS):
            continue
        for child_path, child in block.named_modules():
            path = f"{block_path}.{child_path}"
            if is_spatial(child):
                spatial.append(path)
            elif isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                linear.append(path)
    if not spatial:
        raise ValueError("the UNet has no ResnetBlock2D/Downsample2D/Upsample2D convolutions for conv LoRA")
    return LoconTargets(tuple(spatial), tuple(linear))
