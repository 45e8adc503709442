"""Caption dropout and tag shuffling with kohya's keep_tokens; zero embeddings for dropped captions."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flatlora_diffusion.data.batches import BatchMaker
from flatlora_diffusion.data.captions import augment_captions, shuffle_tags
from flatlora_diffusion.sdxl.conditioning import encode_prompts

CAPTION = "sks, dog, red collar , grass, sunny, park"


def options(**kw):
    base = dict(seed=0, caption_dropout_rate=0.0, shuffle_caption=False, keep_tokens=0)
    return SimpleNamespace(**{**base, **kw})


def test_shuffle_keeps_the_first_tags_and_permutes_the_rest():
    rng = np.random.default_rng(0)
    seen = {shuffle_tags(CAPTION, 2, rng) for _ in range(30)}
    assert len(seen) > 5
    for caption in seen:
        tags = caption.split(", ")
        assert tags[:2] == ["sks", "dog"] and sorted(tags[2:]) == ["grass", "park", "red collar", "sunny"]


def test_caption_draws_are_a_function_of_seed_batch_and_position():
    config = options(shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.3)
    a = [augment_captions([CAPTION] * 4, config, n) for n in range(50)]
    assert a == [augment_captions([CAPTION] * 4, config, n) for n in range(50)]  # resume redraws the same
    flat = [c for batch in a for c in batch]
    dropped = sum(c == "" for c in flat) / len(flat)
    assert 0.2 < dropped < 0.4
    assert all(c.startswith("sks, ") for c in flat if c)  # the trigger stays first
    assert len({c for c in flat if c}) > 10
    other_seed = [augment_captions([CAPTION] * 4, options(**{**vars(config), "seed": 1}), n) for n in range(50)]
    assert other_seed != a


def test_captions_are_untouched_without_the_options():
    assert augment_captions([CAPTION, "b"], options(), 7) == [CAPTION, "b"]


@pytest.fixture(scope="module")
def parts(default_model_dir):
    from flatlora_diffusion.sdxl.models import load_sdxl

    return load_sdxl(str(default_model_dir))


def maker(parts, encoders=None, **kw):
    config = SimpleNamespace(**{"center_crop": False, "shuffle_caption": False, "cache_latents_to_disk": None, **kw})
    return BatchMaker(parts, config, "cpu", torch.float32, encoders)


def test_dropped_captions_get_zero_embeddings_and_the_others_their_own(parts):
    got = maker(parts).embeds(["a red circle", "", "a blue square"])
    with torch.no_grad():
        want = encode_prompts(parts.text_encoders, parts.tokenizers, ["a red circle", "a blue square"], "cpu")
    assert torch.equal(got.hidden[1], torch.zeros_like(got.hidden[1])) and got.pooled[1].abs().max() == 0
    assert torch.allclose(got.hidden[[0, 2]], want.hidden, atol=1e-6)
    assert torch.allclose(got.pooled[[0, 2]], want.pooled, atol=1e-6)
    only_dropped = maker(parts).embeds(["", ""])
    assert only_dropped.hidden.shape == got.hidden[:2].shape and only_dropped.hidden.abs().max() == 0


def test_prompt_embeddings_are_cached_only_when_they_cannot_change(parts):
    assert maker(parts).cache_prompts
    assert not maker(parts, shuffle_caption=True).cache_prompts
    assert not maker(parts, encoders=parts.text_encoders).cache_prompts
    cached = maker(parts)
    cached.embeds(["a red circle", ""])
    assert list(cached._prompt_cache) == ["a red circle"]  # the dropped caption needs no entry


def test_without_force_zeros_a_dropped_caption_is_the_encoded_empty_prompt(parts, tmp_path):
    import dataclasses
    import json

    from flatlora_diffusion.sdxl.models import _force_zeros_for_empty_prompt

    assert parts.force_zeros_for_empty_prompt  # read from the embedded model's model_index.json
    (tmp_path / "model_index.json").write_text(json.dumps({"force_zeros_for_empty_prompt": False}))
    assert not _force_zeros_for_empty_prompt(str(tmp_path))
    plain = dataclasses.replace(parts, force_zeros_for_empty_prompt=False)
    got = maker(plain).embeds(["", "a red circle"])
    with torch.no_grad():
        want = encode_prompts(parts.text_encoders, parts.tokenizers, ["", "a red circle"], "cpu")
    assert got.hidden.abs().max() > 0
    assert torch.allclose(got.hidden, want.hidden, atol=1e-6) and torch.allclose(got.pooled, want.pooled, atol=1e-6)
