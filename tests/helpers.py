"""Small builders shared by tests: LoRA away from identity, SDXL-shaped inputs."""

from __future__ import annotations

import torch

from flatlora_diffusion.lora.attach import LoraOptions, add_text_encoder_lora, add_unet_lora

# alpha != rank and random (non-zero) B, so that no test can pass because the LoRA is a no-op.
TEST_LORA = LoraOptions(rank=4, alpha=6.0, init="none")


def add_test_loras(pipe, text_encoders: bool = True, options: LoraOptions = TEST_LORA):
    add_unet_lora(pipe.unet, options)
    if text_encoders:
        add_text_encoder_lora(pipe.text_encoder, options)
        add_text_encoder_lora(pipe.text_encoder_2, options)
    return pipe


def unet_inputs(unet, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    size = cfg.sample_size
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return dict(
        sample=torch.randn(batch, cfg.in_channels, size, size, generator=g),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        encoder_hidden_states=torch.randn(batch, 8, cfg.cross_attention_dim, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(batch, pooled, generator=g),
                           "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)},
    )


def unet_loss(unet, inputs) -> torch.Tensor:
    return unet(**inputs).sample.square().mean()


def text_inputs(batch: int = 2, seed: int = 0, vocab: int = 700, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def text_loss(text_encoder, ids) -> torch.Tensor:
    out = text_encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2].square().mean() + out.last_hidden_state.square().mean()
