"""Shared fixtures: tiny SDXL models built from configs in code, nothing downloaded."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread is as fast and immune to oversubscription on a busy 2-core machine.
torch.set_num_threads(1)

from flatlora_diffusion.default_model import build_default_pipeline, write_default_model  # noqa: E402
from flatlora_diffusion.tokenizer import save_tokenizer_files  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer_files(folder)
    return folder


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory):
    """The embedded default model written to disk once per test session."""
    return write_default_model(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture
def tiny_pipe(tokenizer_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_default_pipeline(seed=0, tokenizer_dir=tokenizer_dir)
