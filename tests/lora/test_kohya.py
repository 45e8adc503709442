"""kohya files: SGM naming on the real SDXL layout, true alpha, and imports of other tools' variants."""

from __future__ import annotations

import re

import pytest
import torch
from peft.tuners.lora import LoraLayer

from flatlora_diffusion.lora.attach import LoraOptions, add_text_encoder_lora, add_unet_lora
from flatlora_diffusion.lora.formats import read_safetensors, to_kohya, write_safetensors
from flatlora_diffusion.lora.kohya_names import UnetLayout, sgm_name
from flatlora_diffusion.lora.load import load_lora_into_pipeline
from flatlora_diffusion.lora.lora_set import LoraFileError
from flatlora_diffusion.lora.save import lora_set_from_models
from flatlora_diffusion.sdxl.published_configs import SDXL_UNET_CONFIG, meta_sdxl_models
from tests.lora_helpers import assert_same_outputs, fresh_pipe, no_warnings_allowed, trained_export  # noqa: F401

SUFFIX = r"\.(lora_down\.weight|lora_up\.weight|alpha)$"
UNET_KEY = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_\d+(_\d+)?_.*" + SUFFIX)
TE_KEY = re.compile(r"^lora_te[12]_text_model_encoder_layers_\d+_self_attn_(q|k|v|out)_proj" + SUFFIX)


@pytest.fixture(scope="module")
def real_sdxl_kohya():
    """kohya keys of a LoRA on the real SDXL architecture, built on the meta device (no memory)."""
    unet, te1, te2 = meta_sdxl_models()
    options = LoraOptions(rank=4, alpha=6.0)
    add_unet_lora(unet, options)
    add_text_encoder_lora(te1, options)
    add_text_encoder_lora(te2, options)
    lora_set = lora_set_from_models(unet, te1, te2)
    return lora_set, to_kohya(lora_set, UnetLayout.from_config(unet.config)), unet


def expected_sgm_attention_names() -> set[str]:
    """SDXL's transformer blocks under SGM naming, written out from the SGM architecture itself."""
    depth = {**{f"input_blocks.{i}.1": 2 for i in (4, 5)}, **{f"input_blocks.{i}.1": 10 for i in (7, 8)},
             "middle_block.1": 10, **{f"output_blocks.{i}.1": 10 for i in (0, 1, 2)},
             **{f"output_blocks.{i}.1": 2 for i in (3, 4, 5)}}
    return {f"{block}.transformer_blocks.{t}.{attn}.{proj}" for block, n in depth.items() for t in range(n)
            for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")}


def test_real_sdxl_counts(real_sdxl_kohya):
    lora_set, keys, _ = real_sdxl_kohya
    counts = {c: len(m) for c, m in lora_set.modules.items()}
    assert counts == {"unet": 560, "text_encoder": 48, "text_encoder_2": 128}
    per_block = {}
    for name in lora_set.modules["unet"]:
        block = ".".join(name.split(".")[:2]) if name.startswith(("down", "up")) else "mid_block"
        per_block[block] = per_block.get(block, 0) + 1
    assert per_block == {"down_blocks.1": 32, "down_blocks.2": 160, "mid_block": 80, "up_blocks.0": 240,
                         "up_blocks.1": 48}
    assert len(keys) == 2208


def test_real_sdxl_kohya_keys_are_the_sgm_modules(real_sdxl_kohya):
    _, keys, _ = real_sdxl_kohya
    unet = meta_sdxl_models()[0]  # without LoRA layers: every Linear/Conv2d is a plain module
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    unet_stems = {s for s in stems if s.startswith("lora_unet_")}
    expected = expected_sgm_attention_names()
    assert unet_stems == {"lora_unet_" + n.replace(".", "_") for n in expected}
    layout = UnetLayout.from_config(unet.config)
    sgm_modules = {sgm_name(path, layout) for path, module in unet.named_modules()
                   if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
    assert expected <= sgm_modules
    for known in ("input_blocks.4.1.transformer_blocks.0.attn1.to_q",
                  "middle_block.1.transformer_blocks.9.attn2.to_out.0",
                  "output_blocks.0.1.transformer_blocks.0.attn1.to_k"):
        assert known in sgm_modules and "lora_unet_" + known.replace(".", "_") in unet_stems
    assert all(UNET_KEY.match(k) or TE_KEY.match(k) for k in keys)


def test_sgm_names_of_non_attention_modules_follow_the_sgm_layout():
    layout = UnetLayout.from_config(SDXL_UNET_CONFIG)
    assert sgm_name("conv_in", layout) == "input_blocks.0.0"
    assert sgm_name("down_blocks.0.resnets.1.conv1", layout) == "input_blocks.2.0.in_layers.2"
    assert sgm_name("down_blocks.0.downsamplers.0.conv", layout) == "input_blocks.3.0.op"
    assert sgm_name("down_blocks.2.attentions.1.proj_in", layout) == "input_blocks.8.1.proj_in"
    assert sgm_name("mid_block.resnets.1.time_emb_proj", layout) == "middle_block.2.emb_layers.1"
    assert sgm_name("up_blocks.0.upsamplers.0.conv", layout) == "output_blocks.2.2.conv"
    assert sgm_name("up_blocks.2.resnets.2.conv_shortcut", layout) == "output_blocks.8.0.skip_connection"
    assert sgm_name("add_embedding.linear_1", layout) == "label_emb.0.0"


def test_sgm_mapping_is_derived_from_the_config_not_hard_coded(default_model_dir):
    # The tiny model has one layer per down block: input_blocks = conv_in, res, down, res+attn,
    # down, res+attn; output blocks take two layers each.
    layout = UnetLayout.from_config(fresh_pipe(default_model_dir).unet.config)
    assert sgm_name("down_blocks.1.attentions.0.proj_out", layout) == "input_blocks.3.1.proj_out"
    assert sgm_name("down_blocks.1.downsamplers.0.conv", layout) == "input_blocks.4.0.op"
    assert sgm_name("down_blocks.2.attentions.0.proj_in", layout) == "input_blocks.5.1.proj_in"
    assert sgm_name("up_blocks.1.attentions.1.proj_in", layout) == "output_blocks.3.1.proj_in"
    assert sgm_name("up_blocks.1.upsamplers.0.conv", layout) == "output_blocks.3.2.conv"


def test_a1111_text_encoder_2_rule_every_layer_has_q_k_v_out(real_sdxl_kohya):
    _, keys, _ = real_sdxl_kohya
    found: dict[int, set[str]] = {}
    for key in keys:
        match = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_self_attn_(q|k|v|out)_proj\.lora_down", key)
        if match:
            found.setdefault(int(match[1]), set()).add(match[2])
    assert found == {i: {"q", "k", "v", "out"} for i in range(32)}


@pytest.fixture
def trained(default_model_dir, tmp_path_factory):
    pipe, _, paths, expected = trained_export(default_model_dir, tmp_path_factory)
    return pipe, paths["kohya"], expected


def test_tiny_file_key_formats_and_true_alpha(trained):
    _, path, _ = trained
    tensors, _ = read_safetensors(path)
    assert all(UNET_KEY.match(k) or TE_KEY.match(k) for k in tensors), [k for k in tensors if not UNET_KEY.match(k)][:3]
    alphas = [t for k, t in tensors.items() if k.endswith(".alpha")]
    assert len(alphas) == len(tensors) // 3 and all(t.ndim == 0 and t.item() == 6.0 for t in alphas)


def test_file_delta_equals_the_in_memory_merged_delta_for_every_module(trained):
    pipe, path, _ = trained
    tensors, _ = read_safetensors(path)
    layout = UnetLayout.from_config(pipe.unet.config)
    checked = 0
    models = (("lora_unet_", pipe.unet), ("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2))
    for prefix, model in models:
        for name, layer in model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            te_name = "text_model." + name.removeprefix("text_model.")
            path_name = sgm_name(name, layout) if prefix == "lora_unet_" else te_name
            stem = prefix + path_name.replace(".", "_")
            down, up = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
            weight = layer.get_base_layer().weight
            from_file = weight + tensors[f"{stem}.alpha"] / down.shape[0] * (up @ down)
            in_memory = weight + layer.get_delta_weight("default")
            assert torch.allclose(from_file, in_memory, atol=1e-6, rtol=0), stem
            checked += 1
    assert checked == len(tensors) // 3 == 72


def _rewrite(path, out, rename=lambda k: k, drop_alpha=False):
    tensors, metadata = read_safetensors(path)
    new = {}
    for key, tensor in tensors.items():
        stem = key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0]
        if drop_alpha and key.endswith(".alpha"):
            continue
        if drop_alpha and key.endswith("lora_up.weight"):  # fold alpha/rank into up: same model, alpha = rank
            tensor = tensor * (tensors[f"{stem}.alpha"] / tensor.shape[1])
        new[key.replace(stem, rename(stem))] = tensor
    return write_safetensors(out, new, metadata)


def test_imports_diffusers_block_named_kohya_keys(trained, default_model_dir, tmp_path):
    source, path, expected = trained
    # Other tools name the UNet by diffusers blocks: lora_unet_down_blocks_1_attentions_0_...
    layout = UnetLayout.from_config(source.unet.config)
    by_sgm = {sgm_name(n, layout).replace(".", "_"): n.replace(".", "_")
              for n, m in source.unet.named_modules() if isinstance(m, LoraLayer)}
    renamed = _rewrite(path, tmp_path / "blocks.safetensors",
                       rename=lambda s: "lora_unet_" + by_sgm[s[10:]] if s.startswith("lora_unet_") else s)
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0") for k in read_safetensors(renamed)[0])
    pipe = fresh_pipe(default_model_dir)
    with no_warnings_allowed():
        load_lora_into_pipeline(pipe, renamed)
    assert_same_outputs(pipe, expected)


def test_imports_kohya_file_without_alpha_as_alpha_equal_rank(trained, default_model_dir, tmp_path):
    _, path, expected = trained
    no_alpha = _rewrite(path, tmp_path / "no_alpha.safetensors", drop_alpha=True)
    assert not any(k.endswith(".alpha") for k in read_safetensors(no_alpha)[0])
    pipe = fresh_pipe(default_model_dir)
    load_lora_into_pipeline(pipe, no_alpha)
    assert_same_outputs(pipe, expected)


@pytest.mark.parametrize("key, message", [
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", "SD 1.x/2.x"),
    ("lora_unet_input_blocks_99_1_transformer_blocks_0_attn1_to_q.lora_down.weight", "names no module"),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.hada_w1_a", "LyCORIS LoHa"),
    ("model.diffusion_model.input_blocks.0.0.weight", "not an SDXL LoRA"),
])
def test_foreign_or_unsupported_files_raise_a_clear_error(default_model_dir, tmp_path, key, message):
    path = write_safetensors(tmp_path / "bad.safetensors", {key: torch.zeros(4, 8)}, {})
    with pytest.raises(LoraFileError, match=message):
        load_lora_into_pipeline(fresh_pipe(default_model_dir), path)


def test_shape_mismatch_is_refused(trained, default_model_dir, tmp_path):
    _, path, _ = trained
    tensors, metadata = read_safetensors(path)
    key = next(k for k in tensors if k.startswith("lora_unet_") and k.endswith("lora_down.weight"))
    tensors[key] = torch.zeros(4, 5)
    bad = write_safetensors(tmp_path / "bad.safetensors", tensors, metadata)
    with pytest.raises(LoraFileError, match="is this a LoRA for SDXL"):
        load_lora_into_pipeline(fresh_pipe(default_model_dir), bad)


def test_imports_other_tools_conv_and_resnet_linear_modules(default_model_dir, tmp_path):
    # kohya LoCon-style files also patch resnet convolutions (3x3 down, 1x1 up) and time_emb_proj.
    g = torch.Generator().manual_seed(0)
    conv = "lora_unet_input_blocks_1_0_in_layers_2"  # down_blocks.0.resnets.0.conv1: 48 -> 48, 3x3
    linear = "lora_unet_output_blocks_1_0_emb_layers_1"  # up_blocks.0.resnets.1.time_emb_proj
    pipe = fresh_pipe(default_model_dir)
    emb = pipe.unet.up_blocks[0].resnets[1].time_emb_proj
    tensors = {f"{conv}.lora_down.weight": torch.randn(2, 48, 3, 3, generator=g),
               f"{conv}.lora_up.weight": torch.randn(48, 2, 1, 1, generator=g), f"{conv}.alpha": torch.tensor(1.0),
               f"{linear}.lora_down.weight": torch.randn(3, emb.in_features, generator=g),
               f"{linear}.lora_up.weight": torch.randn(emb.out_features, 3, generator=g)}  # no alpha: alpha = rank
    path = write_safetensors(tmp_path / "locon.safetensors", tensors, {})
    load_lora_into_pipeline(pipe, path)
    conv_layer = pipe.unet.down_blocks[0].resnets[0].conv1
    expected = 0.5 * (tensors[f"{conv}.lora_up.weight"].flatten(1) @ tensors[f"{conv}.lora_down.weight"].flatten(1))
    assert torch.allclose(conv_layer.get_delta_weight("default"), expected.reshape(48, 48, 3, 3), atol=1e-6)
    linear_layer = pipe.unet.up_blocks[0].resnets[1].time_emb_proj
    expected = tensors[f"{linear}.lora_up.weight"] @ tensors[f"{linear}.lora_down.weight"]
    assert torch.allclose(linear_layer.get_delta_weight("default"), expected, atol=1e-6)
