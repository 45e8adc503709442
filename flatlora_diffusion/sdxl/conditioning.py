"""SDXL conditioning: prompt embeddings and micro-conditioning time ids, as the pipeline feeds the UNet.

Mirrors `StableDiffusionXLPipeline.encode_prompt` (clip_skip=None) and `_get_add_time_ids` in
diffusers 0.42: each prompt is padded to the tokenizer's max length and goes through both CLIP
encoders; the penultimate hidden states are concatenated along features, and the pooled,
projected output of the second encoder is the `text_embeds` of the added conditioning. With
`force_zeros_for_empty_prompt` (the SDXL default) the unconditional branch is all zeros, so
caption dropout drops to zeros too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptEmbeds:
    hidden: torch.Tensor  # (B, tokens, dim1 + dim2)
    pooled: torch.Tensor  # (B, projection_dim)

    def to(self, device, dtype=None) -> "PromptEmbeds":
        return PromptEmbeds(self.hidden.to(device, dtype), self.pooled.to(device, dtype))

    @staticmethod
    def cat(parts: list["PromptEmbeds"]) -> "PromptEmbeds":
        return PromptEmbeds(torch.cat([p.hidden for p in parts]), torch.cat([p.pooled for p in parts]))


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_tokens(text_encoder, text_encoder_2, ids: torch.Tensor, ids_2: torch.Tensor):
    """(prompt_embeds [n, L, w1 + w2], pooled [n, projection_dim]) with gradients if the encoders need them."""
    out_1 = text_encoder(ids, output_hidden_states=True)
    out_2 = text_encoder_2(ids_2, output_hidden_states=True)
    embeds = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    return embeds, out_2[0]  # output[0] of CLIPTextModelWithProjection is text_embeds, as in encode_prompt


def encode_prompts(text_encoders, tokenizers, prompts: list[str], device) -> PromptEmbeds:
    """Encode `prompts` as the SDXL pipeline does (gradients flow when the encoders train)."""
    ids = [tokenize(tokenizer, prompts).to(device) for tokenizer in tokenizers]
    return PromptEmbeds(*encode_tokens(*text_encoders, *ids))


def drop_captions(embeds: torch.Tensor, pooled: torch.Tensor, keep: torch.Tensor):
    """Zero the conditioning where `keep` is False: the pipeline's unconditional input for CFG."""
    keep = keep.to(embeds.dtype)
    return embeds * keep[:, None, None], pooled * keep[:, None]


def time_ids(batch: int, size: int = 64) -> torch.Tensor:
    """SDXL micro-conditioning of an uncropped square image: original size, crop top-left, target size."""
    return torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(batch, 1)
