"""Attach PEFT LoRA adapters to SDXL's UNet and text encoders (the diffusers script's targets)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model_state_dict

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

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.alpha is None:
            self.alpha = float(self.rank)
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INIT_CHOICES:
            raise ValueError(f"init must be one of {INIT_CHOICES}, got {self.init!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def peft_config(self, targets: tuple[str, ...]) -> LoraConfig:
        init = {"default": True, "none": False}.get(self.init, self.init)
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          init_lora_weights=init, target_modules=list(targets))


def add_lora(model: torch.nn.Module, options: LoraOptions, targets: tuple[str, ...],
             adapter_name: str = "default") -> torch.nn.Module:
    """Inject LoRA into `model` in place (diffusers models and transformers models alike).

    Trainable LoRA parameters are kept in fp32 even when the base is bf16/fp16: fp16 LoRA
    parameters are what makes GradScaler fail with "Attempting to unscale FP16 gradients".
    """
    model.requires_grad_(False)
    model.add_adapter(options.peft_config(targets), adapter_name=adapter_name)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
    return model


def add_unet_lora(unet, options: LoraOptions):
    return add_lora(unet, options, UNET_TARGETS)


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
