"""The toy world: deterministic pixels, captions the pixels agree with, a measuring stick, and a model that draws."""

from __future__ import annotations

import json
import warnings
from collections import Counter

import numpy as np
import pytest
import torch

from flatlora_diffusion.toyworld import toy_world
from flatlora_diffusion.toyworld.pretrain import WORLD_MODEL_DIR, PretrainConfig, lr_factor, pretrain
from flatlora_diffusion.toyworld.timed_loop import in_final_part, run_steps, total_from_commit
from flatlora_diffusion.toyworld.world_metrics import (
    background_colour,
    classify_shapes,
    foreground_colour,
    load_shape_classifier,
)
from flatlora_diffusion.training.losses import min_snr_weights

ALL_SHAPE_COMBOS = toy_world.all_combos(toy_world.ALL_SHAPES)


# ---------------------------------------------------------------- the world


def test_same_seed_same_pixels_other_seed_other_pixels():
    a, scenes_a = toy_world.generate(3, 16)
    b, scenes_b = toy_world.generate(3, 16)
    c, _ = toy_world.generate(4, 16)
    assert a.shape == (16, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and scenes_a == scenes_b
    assert not np.array_equal(a, c)


def test_generating_leaves_the_global_rngs_alone():
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    toy_world.generate(0, 4)
    assert np.array_equal(np_state, np.random.get_state()[1]) and torch.equal(torch_state, torch.get_rng_state())


def test_captions_name_the_drawn_colours_and_shape_is_never_the_background():
    scene = toy_world.Scene("ring", "red", "blue", 30.0, 34.0, 12.0)
    image = toy_world.render(scene)
    assert scene.caption == "a red ring on a blue background"
    assert tuple(image[0, 0]) == toy_world.PALETTE["blue"]
    assert tuple(image[34, 30 + 10]) == toy_world.PALETTE["red"]  # on the ring's band
    assert tuple(image[34, 30]) == toy_world.PALETTE["blue"]  # the hole
    assert toy_world.ground_truth(scene) == {"shape": "ring", "colour": "red", "background": "blue",
                                             "bbox": (18.0, 22.0, 42.0, 46.0)}
    with pytest.raises(ValueError, match="Scene.colour"):
        toy_world.Scene("circle", "red", "red", 32, 32, 10)


def test_held_out_split_is_fixed_disjoint_balanced_and_composable():
    held, train = toy_world.held_out_combos(), toy_world.train_combos()
    assert held == toy_world.held_out_combos() and len(held) == 64 and len(train) == 216
    assert not set(held) & set(train) and set(held) | set(train) == set(toy_world.all_combos())
    assert max(Counter(s for _, s, _ in held).values()) - min(Counter(s for _, s, _ in held).values()) <= 1
    for c, s, b in held:  # every pair of words of a held-out combination was seen together in training
        assert any(x[:2] == (c, s) for x in train) and any(x[1:] == (s, b) for x in train)
        assert any(x[0] == c and x[2] == b for x in train)
    assert not set(toy_world.SUBJECT_SHAPES) & {s for _, s, _ in train}


# ---------------------------------------------------------------- measuring what an image shows


def test_metrics_recover_colour_and_background_exactly_on_world_images():
    images, scenes = toy_world.generate(11, 200, ALL_SHAPE_COMBOS)
    for image, scene in zip(images, scenes):
        assert background_colour(image) == scene.background
        assert foreground_colour(image) == scene.colour


def test_shape_classifier_is_accurate_on_fresh_procedural_images():
    # Measured: 100.0 % on these 400 images (all nine shapes, seed 12345, unseen in training).
    images, scenes = toy_world.generate(12345, 400, ALL_SHAPE_COMBOS)
    predicted = classify_shapes(images, load_shape_classifier())
    accuracy = np.mean([p == s.shape for p, s in zip(predicted, scenes)])
    assert accuracy >= 0.9, accuracy


# ---------------------------------------------------------------- the training pieces


def test_budgeted_loop_commits_to_a_total_that_a_fixed_run_repeats():
    for k in range(1, 200):
        total = total_from_commit(k, 7)
        assert [s for s in range(total) if in_final_part(s, total, 7)] == list(range(k, total))
    seen = []
    done, _ = run_steps(lambda i, total: seen.append(total) or 0.0, "t", budget_s=0.0, commit_tenths=7,
                        log=lambda m: None)
    assert done == 1 and seen == [None]
    assert lr_factor(0, None, warmup=50) == pytest.approx(1 / 50)
    assert lr_factor(99, 100, warmup=50) < 0.2 < lr_factor(60, 100, warmup=50)


def test_min_snr_weights_cap_only_the_easy_timesteps():
    from diffusers import DDPMScheduler

    from flatlora_diffusion.sdxl.default_model import scheduler_config

    weights = min_snr_weights(DDPMScheduler(**scheduler_config()), torch.tensor([0, 999]), gamma=5.0)
    assert weights[0] < 0.01 and weights[1] == 1.0
    with pytest.raises(ValueError, match="min_snr_gamma"):
        PretrainConfig(min_snr_gamma=-1)


def test_pretrain_smoke_writes_a_loadable_pipeline_and_repeats_bit_for_bit(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    tiny = dict(images=32, vae_steps=2, decoder_steps=1, unet_steps=2, vae_batch=4, unet_batch=4, psnr_images=8)
    record = pretrain(PretrainConfig(out=tmp_path / "a", **tiny))
    pretrain(PretrainConfig(out=tmp_path / "b", **tiny))
    assert (record["vae_steps"], record["decoder_steps"], record["unet_steps"]) == (2, 1, 2)
    assert json.loads((tmp_path / "a" / "training.json").read_text())["reproduce"].endswith("--unet-steps 2")
    a, b = (StableDiffusionXLPipeline.from_pretrained(tmp_path / name) for name in "ab")
    assert a.vae.config.scaling_factor == pytest.approx(record["scaling_factor"])
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), part


# ---------------------------------------------------------------- the committed model


@pytest.mark.skipif(not (WORLD_MODEL_DIR / "model_index.json").is_file(),
                    reason=f"no pretrained world model at {WORLD_MODEL_DIR}; "
                           "run python -m flatlora_diffusion.toyworld.pretrain")
def test_committed_model_draws_the_prompted_colour():
    from diffusers import StableDiffusionXLPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionXLPipeline.from_pretrained(WORLD_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    combos = toy_world.held_out_combos()[::8]  # 8 prompts, never trained on; measured 8/8 right
    prompts = [toy_world.caption(*combo) for combo in combos]
    images = pipe(prompts, num_inference_steps=10, guidance_scale=4.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    images = np.rint(images * 255).astype(np.uint8)
    right = sum(foreground_colour(image) == colour for image, (colour, _, _) in zip(images, combos))
    assert right >= 6, f"{right}/8 images show the prompted colour"
