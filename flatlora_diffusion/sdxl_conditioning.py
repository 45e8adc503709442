"""SDXL's text and size conditioning, written for training so it matches what the pipeline feeds the UNet.

Mirrors `StableDiffusionXLPipeline.encode_prompt` (clip_skip=None) and `_get_add_time_ids` in
diffusers 0.42: each prompt is padded to the tokenizer's max length, both text encoders run with
hidden states, the penultimate hidden states are concatenated on the feature axis, and the
pooled embedding is the projected output of text encoder 2. With `force_zeros_for_empty_prompt`
(the SDXL default) the unconditional branch is all zeros, so training drops captions to zeros too.
"""

from __future__ import annotations

import torch


def encode_tokens(text_encoder, text_encoder_2, ids: torch.Tensor, ids_2: torch.Tensor):
    """(prompt_embeds [n, L, w1 + w2], pooled [n, projection_dim]) with gradients if the encoders need them."""
    out_1 = text_encoder(ids, output_hidden_states=True)
    out_2 = text_encoder_2(ids_2, output_hidden_states=True)
    embeds = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    return embeds, out_2[0]  # output[0] of CLIPTextModelWithProjection is text_embeds, as in encode_prompt


def drop_captions(embeds: torch.Tensor, pooled: torch.Tensor, keep: torch.Tensor):
    """Zero the conditioning where `keep` is False: the pipeline's unconditional input for CFG."""
    keep = keep.to(embeds.dtype)
    return embeds * keep[:, None, None], pooled * keep[:, None]


def time_ids(batch: int, size: int = 64) -> torch.Tensor:
    """SDXL micro-conditioning: original size, crop top-left, target size (no crops in our world)."""
    return torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(batch, 1)
