"""Inference helpers: base vs LoRA with one seed, LoRA switching without reloading the base."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flatlora_diffusion.inference import (
    active_loras,
    apply_loras,
    generate,
    generate_base_and_lora,
    load_base,
    lora_disabled,
    read_lora_metadata,
)
from flatlora_diffusion.lora.lora_set import LoraFileError
from flatlora_diffusion.lora.save import save_lora_files
from tests.helpers import TEST_LORA, add_test_loras
from tests.lora_helpers import fresh_pipe  # noqa: F401  (a fixture)

SETTINGS = dict(steps=2, guidance=1.0, width=64, height=64)  # no CFG: half the compute


@pytest.fixture(scope="module")
def lora_files(default_model_dir, tmp_path_factory):
    """Two different LoRA files (random non-zero B): one with text encoders (kohya), one UNet-only."""
    files = []
    for seed, text_encoders, kind in ((1, True, "kohya"), (2, False, "diffusers")):
        pipe = fresh_pipe(default_model_dir)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            add_test_loras(pipe, text_encoders=text_encoders)
        models = [pipe.unet] + ([pipe.text_encoder, pipe.text_encoder_2] if text_encoders else [])
        files.append(save_lora_files(tmp_path_factory.mktemp(f"lora{seed}"), *models, lora=TEST_LORA)[kind])
    return files


@pytest.fixture(scope="module")
def pipe(default_model_dir):
    return load_base(default_model_dir)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_base_and_lora_differ_and_scale_zero_is_the_base(pipe, lora_files):
    base, lora = generate_base_and_lora(pipe, [(lora_files[0], 1.0)], "a red circle", seed=3, **SETTINGS)
    assert np.abs(pixels(base) - pixels(lora)).max() > 0
    apply_loras(pipe, [(lora_files[0], 0.0)])
    assert np.array_equal(pixels(generate(pipe, "a red circle", 3, **SETTINGS)), pixels(base))
    apply_loras(pipe, [])
    assert np.array_equal(pixels(generate(pipe, "a red circle", 3, **SETTINGS)), pixels(base))


def test_switching_loras_keeps_the_base_and_loads_each_file_once(pipe, lora_files):
    unet = pipe.unet
    weight = unet.conv_in.weight
    ptr, before = weight.data_ptr(), weight.detach().clone()
    first = generate(pipe, "a blue square", 5, **SETTINGS) if apply_loras(pipe, [(lora_files[0], 1.0)]) else None
    apply_loras(pipe, [(lora_files[1], 0.7)])
    assert active_loras(pipe) == {next(iter(active_loras(pipe))): pytest.approx(0.7)}
    second = generate(pipe, "a blue square", 5, **SETTINGS)
    apply_loras(pipe, [(lora_files[0], 1.0), (lora_files[1], 0.5)])
    assert len(active_loras(pipe)) == 2
    apply_loras(pipe, [(lora_files[0], 1.0)])
    again = generate(pipe, "a blue square", 5, **SETTINGS)
    assert pipe.unet is unet and weight.data_ptr() == ptr and torch.equal(weight, before)
    assert len(pipe.unet.peft_config) == 2 and len(pipe.text_encoder.peft_config) == 1
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(second))


def test_lora_disabled_restores_the_selection(pipe, lora_files):
    apply_loras(pipe, [(lora_files[0], 0.8)])
    before = active_loras(pipe)
    with lora_disabled(pipe):
        assert active_loras(pipe) == {}
    assert active_loras(pipe) == before


def test_read_lora_metadata_and_bad_file(lora_files, tmp_path, pipe):
    metadata = read_lora_metadata(lora_files[0])
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_network_dim"] == "4"
    with pytest.raises(LoraFileError, match="no such file"):
        apply_loras(pipe, [(tmp_path / "missing.safetensors", 1.0)])
