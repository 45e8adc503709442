"""SDXL conditioning: prompt embeddings and micro-conditioning time ids.

Mirrors `StableDiffusionXLPipeline.encode_prompt` (diffusers): each prompt goes through both
CLIP encoders; the penultimate hidden states are concatenated along features, and the pooled,
projected output of the second encoder is the `text_embeds` of the added conditioning.
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


def encode_prompts(text_encoders, tokenizers, prompts: list[str], device) -> PromptEmbeds:
    """Encode `prompts` as the SDXL pipeline does (gradients flow when the encoders train)."""
    hidden_states, pooled = [], None
    for encoder, tokenizer in zip(text_encoders, tokenizers):
        ids = tokenize(tokenizer, prompts).to(device)
        out = encoder(ids, output_hidden_states=True)
        pooled = out[0]  # the last encoder's pooled projection (text_embeds) is the one kept
        hidden_states.append(out.hidden_states[-2])
    return PromptEmbeds(torch.cat(hidden_states, dim=-1), pooled)


