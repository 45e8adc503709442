"""The embedded default model: deterministic, offline, and a real diffusers folder."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTokenizer

from flatlora_diffusion.sdxl.default_model import build_default_pipeline
from flatlora_diffusion.sdxl.tokenizer import WORDS


def test_same_seed_same_weights_other_seed_other_weights(tokenizer_dir):
    a = build_default_pipeline(0, tokenizer_dir).unet.state_dict()
    b = build_default_pipeline(0, tokenizer_dir).unet.state_dict()
    c = build_default_pipeline(1, tokenizer_dir).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_building_leaves_the_global_rng_alone(tokenizer_dir):
    state = torch.get_rng_state()
    build_default_pipeline(3, tokenizer_dir)
    assert torch.equal(state, torch.get_rng_state())


def test_tokenizer_words_are_single_tokens_and_unknown_words_fall_back_to_bytes(random_model_dir):
    tok = CLIPTokenizer.from_pretrained(random_model_dir / "tokenizer_2")
    for word in WORDS:
        assert len(tok(word).input_ids) == 3, word  # <bos> word <eos>
    assert tok.decode(tok("a zebra").input_ids, skip_special_tokens=True).strip() == "a zebra"
    assert tok.model_max_length == 32


def test_sdxl_architecture_pieces(random_model_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(random_model_dir)
    cfg = pipe.unet.config
    assert cfg.addition_embed_type == "text_time"
    assert cfg.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert cfg.projection_class_embeddings_input_dim == (
        pipe.text_encoder_2.config.projection_dim + 6 * cfg.addition_time_embed_dim)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


def test_save_load_round_trip_is_exact(random_model_dir, tokenizer_dir):
    loaded = StableDiffusionXLPipeline.from_pretrained(random_model_dir)
    built = build_default_pipeline(0, tokenizer_dir)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(built, part).state_dict(), getattr(loaded, part).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), part
    kwargs = dict(prompt="a red circle on a blue background", num_inference_steps=3, output_type="np")
    a = built(generator=torch.Generator().manual_seed(0), **kwargs).images
    b = loaded(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert a.shape == (1, 64, 64, 3) and (a == b).all()


def test_committed_pretrained_model_is_the_default_and_has_this_architecture():
    from flatlora_diffusion.sdxl.default_model import WORLD_MODEL_DIR, ensure_default_model, unet_config

    assert ensure_default_model() == WORLD_MODEL_DIR
    pipe = StableDiffusionXLPipeline.from_pretrained(WORLD_MODEL_DIR)
    built = build_default_pipeline(0, WORLD_MODEL_DIR / "tokenizer")
    for key, value in unet_config().items():
        got = pipe.unet.config[key]
        assert (tuple(got) if isinstance(got, list) else got) == value, key
    assert pipe.text_encoder_2.config.hidden_size == built.text_encoder_2.config.hidden_size
