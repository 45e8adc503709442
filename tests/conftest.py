"""Shared fixtures: tiny SDXL models built from configs in code, nothing downloaded."""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread is as fast and immune to oversubscription on a busy 2-core machine.
torch.set_num_threads(1)

from flatlora_diffusion.sdxl.default_model import WORLD_MODEL_DIR, build_default_pipeline, write_default_model  # noqa: E402
from flatlora_diffusion.sdxl.tokenizer import save_tokenizer_files  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer_files(folder)
    return folder


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory):
    """The embedded default (pretrained) model, copied so that no test can alter the committed one."""
    if not (WORLD_MODEL_DIR / "model_index.json").is_file():
        return write_default_model(tmp_path_factory.mktemp("models") / "tiny-sdxl")
    copy = tmp_path_factory.mktemp("models") / "tiny-sdxl-world"
    shutil.copytree(WORLD_MODEL_DIR, copy)
    return copy


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory):
    """The randomly initialised model of the same architecture, written by the real code path."""
    return write_default_model(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture
def tiny_pipe(tokenizer_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_default_pipeline(seed=0, tokenizer_dir=tokenizer_dir)
