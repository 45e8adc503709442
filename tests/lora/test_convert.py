"""The converter CLI: exact round trips, alpha kept, bad input refused with one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from flatlora_diffusion.lora.attach import LoraOptions, add_text_encoder_lora, add_unet_lora
from flatlora_diffusion.lora.convert import main
from flatlora_diffusion.lora.formats import read_safetensors, to_diffusers, write_safetensors
from flatlora_diffusion.lora.lora_set import LoraSet, ModuleLora
from flatlora_diffusion.lora.save import lora_set_from_models
from flatlora_diffusion.sdxl.published_configs import meta_sdxl_models
from tests.lora_helpers import assert_same_outputs, fresh_pipe, no_warnings_allowed, trained_export  # noqa: F401


@pytest.fixture
def exported(default_model_dir, tmp_path_factory):
    _, _, paths, expected = trained_export(default_model_dir, tmp_path_factory)
    return paths, expected


def convert(src, dst, to, base):
    return main([str(src), str(dst), "--to", to, "--base", str(base)])


def test_round_trip_diffusers_kohya_diffusers_is_exact(exported, default_model_dir, tmp_path):
    paths, _ = exported
    assert convert(paths["diffusers"], tmp_path / "k.safetensors", "kohya", default_model_dir) == 0
    assert convert(tmp_path / "k.safetensors", tmp_path / "d.safetensors", "diffusers", default_model_dir) == 0
    a, meta_a = read_safetensors(paths["diffusers"])
    b, meta_b = read_safetensors(tmp_path / "d.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(meta_a["lora_adapter_metadata"]) == json.loads(meta_b["lora_adapter_metadata"])
    assert meta_b["ss_steps"] == "3" and meta_b["ss_base_model_version"] == "sdxl_base_v1-0"
    k, _ = read_safetensors(tmp_path / "k.safetensors")
    ours, _ = read_safetensors(paths["kohya"])
    assert k.keys() == ours.keys() and all(torch.equal(k[key], ours[key]) for key in k)


def test_converted_kohya_to_diffusers_loads_in_diffusers_with_alpha_kept(exported, default_model_dir, tmp_path):
    paths, expected = exported
    assert convert(paths["kohya"], tmp_path / "pytorch_lora_weights.safetensors", "diffusers", default_model_dir) == 0
    pipe = fresh_pipe(default_model_dir)
    with no_warnings_allowed():
        pipe.load_lora_weights(tmp_path)
    assert_same_outputs(pipe, expected)


def test_default_base_is_the_real_sdxl_layout(tmp_path):
    # A rank-1 LoRA shaped for real SDXL (random weights), written in diffusers format, converts
    # with no --base; names and shapes are checked against the meta-device SDXL.
    unet, te1, te2 = meta_sdxl_models()
    options = LoraOptions(rank=1, alpha=2.0)
    for model, add in ((unet, add_unet_lora), (te1, add_text_encoder_lora), (te2, add_text_encoder_lora)):
        add(model, options)
    g = torch.Generator().manual_seed(0)
    shaped = lora_set_from_models(unet, te1, te2)
    lora_set = LoraSet({c: {n: ModuleLora(torch.randn(m.down.shape, generator=g), torch.randn(m.up.shape, generator=g),
                                          m.alpha) for n, m in mods.items()} for c, mods in shaped.modules.items()})
    src = write_safetensors(tmp_path / "sdxl.safetensors", *to_diffusers(lora_set))
    assert main([str(src), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 0
    keys, _ = read_safetensors(tmp_path / "k.safetensors")
    assert len(keys) == 2208
    assert keys["lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0.alpha"].item() == 2.0


def _one_line_exit_2(argv, capsys):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_bad_inputs_give_one_line_and_exit_2(exported, default_model_dir, tmp_path, capsys):
    paths, _ = exported
    out = tmp_path / "out.safetensors"
    base = ["--base", default_model_dir]
    assert "no such file" in _one_line_exit_2([tmp_path / "missing.safetensors", out, "--to", "kohya", *base], capsys)
    text = tmp_path / "notes.safetensors"
    text.write_text("not a safetensors file")
    assert "not a readable safetensors" in _one_line_exit_2([text, out, "--to", "kohya", *base], capsys)
    other = write_safetensors(tmp_path / "other.safetensors", {"model.layer.weight": torch.zeros(2, 2)}, {})
    assert "not an SDXL LoRA" in _one_line_exit_2([other, out, "--to", "kohya", *base], capsys)
    # The tiny model's LoRA does not fit the real SDXL layout (the default base): names, then shapes.
    assert "names no module" in _one_line_exit_2([paths["kohya"], out, "--to", "diffusers"], capsys)
    assert "is this a LoRA for SDXL" in _one_line_exit_2([paths["diffusers"], out, "--to", "kohya"], capsys)
    assert "no such config" in _one_line_exit_2([paths["kohya"], out, "--to", "diffusers", "--base", tmp_path], capsys)
    assert not out.exists()
    out.write_bytes(b"keep me")
    assert "already exists" in _one_line_exit_2([paths["kohya"], out, "--to", "diffusers", *base], capsys)
    assert out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.safetensors", "other.safetensors", "out.safetensors"]


def test_command_line_entry_point(exported, tmp_path):
    paths, _ = exported
    result = subprocess.run([sys.executable, "-m", "flatlora_diffusion.lora.convert", str(paths["kohya"]),
                             str(tmp_path / "x.safetensors"), "--to", "diffusers"], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
