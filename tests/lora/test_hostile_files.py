"""Issue 14: hostile and malformed LoRA files are refused with one line by the converter, load_lora_file
and the inference helpers; NaN weights name the first bad module; nothing is ever unpickled."""

from __future__ import annotations

import re

import pytest
import torch

from flatlora_diffusion.inference import apply_loras, load_base
from flatlora_diffusion.lora.convert import main as convert
from flatlora_diffusion.lora.load import load_lora_file
from flatlora_diffusion.lora.lora_set import LoraFileError
from tests.lora.hostile_files import PICKLE_MARKER, lora_of_random_weights, make_hostile_files
from tests.lora_helpers import fresh_pipe

KINDS = ["truncated", "garbage header", "header length 10^12", "pickle renamed", "torch.save renamed",
         "wrong tensor shapes", "SD 1.5 keys", "LoHa", "LoKr", "NaN weights"]


@pytest.fixture(scope="module")
def hostile(default_model_dir, tmp_path_factory):
    _, paths = lora_of_random_weights(default_model_dir, tmp_path_factory.mktemp("good"))
    good = paths["diffusers"]
    folder = tmp_path_factory.mktemp("hostile")
    return folder, make_hostile_files(good, folder)


@pytest.fixture(scope="module")
def pipe(default_model_dir):
    return load_base(default_model_dir)


@pytest.mark.parametrize("kind", KINDS)
def test_converter_refuses_with_one_line(kind, hostile, default_model_dir, tmp_path, capsys):
    folder, files = hostile
    path, message = files[kind]
    out = tmp_path / "out.safetensors"
    assert convert([str(path), str(out), "--to", "kohya", "--base", str(default_model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and message in err and err.count("\n") == 1, err
    assert not out.exists() and not (folder / PICKLE_MARKER).exists()


@pytest.mark.parametrize("kind", KINDS)
def test_load_lora_file_refuses_and_attaches_nothing(kind, hostile, default_model_dir):
    folder, files = hostile
    path, message = files[kind]
    target = fresh_pipe(default_model_dir)
    with pytest.raises(LoraFileError, match=re.escape(message)):
        load_lora_file(path, target.unet, target.text_encoder, target.text_encoder_2)
    assert not getattr(target.unet, "peft_config", None) and not (folder / PICKLE_MARKER).exists()


@pytest.mark.parametrize("kind", KINDS)
def test_inference_helpers_refuse_and_keep_working(kind, hostile, pipe):
    folder, files = hostile
    path, message = files[kind]
    with pytest.raises(LoraFileError, match=re.escape(message)) as caught:
        apply_loras(pipe, [(path, 1.0)])
    assert str(path) in str(caught.value) and not (folder / PICKLE_MARKER).exists()
    assert apply_loras(pipe, []) == []  # the pipeline is still usable


def test_nan_weights_name_the_file_and_the_first_bad_module(hostile, pipe):
    _, files = hostile
    path, _ = files["NaN weights"]
    with pytest.raises(LoraFileError) as caught:
        apply_loras(pipe, [(path, 1.0)])
    assert str(caught.value) == (f"{path}: non-finite (NaN/inf) LoRA weights, first in unet "
                                 "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v; the file is refused")


def test_a_valid_file_whose_header_length_looks_like_a_pickle_is_read(hostile, tmp_path):
    import struct

    from safetensors.torch import save_file

    from flatlora_diffusion.lora.formats import read_safetensors

    path = tmp_path / "lookalike.safetensors"
    for pad in range(700):  # a header of 640 bytes = 80 02 00 ..., the bytes a protocol-2 pickle starts with
        save_file({"unet.x.lora_A.weight": torch.ones(1, 1)}, str(path), metadata={"pad": "x" * pad})
        if struct.unpack("<Q", path.read_bytes()[:8])[0] == 0x280:
            break
    assert path.read_bytes()[:2] == b"\x80\x02"
    tensors, metadata = read_safetensors(path)
    assert list(tensors) == ["unet.x.lora_A.weight"] and len(metadata["pad"]) == pad
