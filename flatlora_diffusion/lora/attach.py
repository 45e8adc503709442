"""Attach PEFT LoRA adapters to SDXL's UNet and text encoders (the diffusers script's targets)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model_state_dict

from .locon import locon_targets

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
INIT_CHOICES = ("gaussian", "default", "pissa", "olora", "loftq", "none")


@dataclass
class LoraOptions:
    rank: int = field(default=4, metadata={"help": "LoRA rank r"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; scale = alpha / rank (default: rank)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch input"})
    init: str = field(default="gaussian", metadata={
        "help": "PEFT init_lora_weights (gaussian as the diffusers script; 'none' = random B)"})
    conv_rank: int | None = field(default=None, metadata={
        "help": "rank of the UNet's 3x3 conv LoRA (kohya LoCon layout, see lora.locon); None = no conv LoRA"})
    conv_alpha: float | None = field(default=None, metadata={"help": "alpha of the conv LoRA (default: conv_rank)"})

    def __post_init__(self):
        self.alpha = _checked_rank_and_alpha("", self.rank, self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INIT_CHOICES:
            raise ValueError(f"init must be one of {INIT_CHOICES}, got {self.init!r}")
        if self.conv_rank is not None:
            self.conv_alpha = _checked_rank_and_alpha("conv_", self.conv_rank, self.conv_alpha)
        elif self.conv_alpha is not None:
            raise ValueError("conv_alpha is set but conv_rank is not")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def rank_and_alpha(self, spatial: bool) -> tuple[int, float]:
        """(rank, alpha) of a module: the conv pair for kxk convs (k > 1) when conv LoRA is on."""
        if spatial and self.conv_rank is not None:
            return self.conv_rank, float(self.conv_alpha)
        return self.rank, float(self.alpha)

    def peft_config(self, targets: tuple[str, ...], conv_targets: tuple[str, ...] = ()) -> LoraConfig:
        """`targets` at rank/alpha, `conv_targets` (full module paths) at conv_rank/conv_alpha.

        The conv paths go into rank_pattern/alpha_pattern escaped and whole: PEFT matches pattern
        keys as regexes against the end of each module path, so a loose suffix such as
        `samplers.0.conv` would silently miss `downsamplers.0.conv` (lora/locon.py).
        """
        init = {"default": True, "none": False}.get(self.init, self.init)
        conv_rank, conv_alpha = self.rank_and_alpha(spatial=True)
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          init_lora_weights=init, target_modules=[*targets, *conv_targets],
                          rank_pattern={re.escape(p): conv_rank for p in conv_targets},
                          alpha_pattern={re.escape(p): conv_alpha for p in conv_targets})


def _checked_rank_and_alpha(prefix: str, rank: int, alpha: float | None) -> float:
    """The alpha of a (rank, alpha) pair, alpha = rank when not given; raises naming the field."""
    if rank < 1:
        raise ValueError(f"{prefix}rank must be >= 1, got {rank}")
    alpha = float(rank) if alpha is None else alpha
    if alpha <= 0:
        raise ValueError(f"{prefix}alpha must be > 0, got {alpha}")
    return alpha


def add_lora(model: torch.nn.Module, options: LoraOptions, targets: tuple[str, ...],
             adapter_name: str = "default", conv_targets: tuple[str, ...] = ()) -> torch.nn.Module:
    """Inject LoRA into `model` in place (diffusers models and transformers models alike).

    Trainable LoRA parameters are kept in fp32 even when the base is bf16/fp16: fp16 LoRA
    parameters are what makes GradScaler fail with "Attempting to unscale FP16 gradients".
    """
    model.requires_grad_(False)
    model.add_adapter(options.peft_config(targets, conv_targets), adapter_name=adapter_name)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
    return model


def add_unet_lora(unet, options: LoraOptions):
    """LoRA on the attention projections; with `options.conv_rank`, also kohya's LoCon modules."""
    if options.conv_rank is None:
        return add_lora(unet, options, UNET_TARGETS)
    locon = locon_targets(unet)
    return add_lora(unet, options, UNET_TARGETS + locon.linear, conv_targets=locon.spatial)


def add_text_encoder_lora(text_encoder, options: LoraOptions):
    return add_lora(text_encoder, options, TEXT_ENCODER_TARGETS)


def freeze_lora_after_hidden_state(text_encoder, hidden_state: int) -> list[str]:
    """Stop training the LoRA of the layers after `hidden_states[hidden_state]`; returns their names.

    SDXL conditions on text encoder 1's penultimate hidden state only (`hidden_states[-2]`, see
    conditioning.encode_prompts; its pooled output is unused), so the LoRA of its last layer can
    never get a gradient and DDP fails with "parameters that were not used in producing loss".
    The modules stay, so exported files hold every layer as other tools write them; their
    parameters stop requiring grad, so DDP, the optimizer and checkpoints leave them out.
    The layers are found from the encoder's config, never a hard-coded count.
    """
    layers = getattr(text_encoder, "text_model", text_encoder).encoder.layers  # CLIPTextModel has no text_model
    n_layers = text_encoder.config.num_hidden_layers
    if len(layers) != n_layers or not -n_layers - 1 <= hidden_state < 0:
        raise ValueError(f"hidden_states[{hidden_state}] does not fit an encoder of {n_layers} layers")
    first_unreached = n_layers + 1 + hidden_state  # hidden_states[0] is the embedding output
    unreached = {id(p) for layer in layers[first_unreached:] for p in layer.parameters()}
    frozen = []
    for name, param in text_encoder.named_parameters():
        if "lora_" in name and id(param) in unreached:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def lora_parameters(*models: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for model in models for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's LoRA tensors under PEFT names (`...lora_A.weight`), adapter name stripped."""
    return get_peft_model_state_dict(model)
