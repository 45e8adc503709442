"""Conv LoRA (kohya LoCon layout): attachment, both export formats, reloads and SGM names on real SDXL."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from flatlora_diffusion.lora.attach import LoraOptions, add_text_encoder_lora, add_unet_lora, lora_parameters
from flatlora_diffusion.lora.convert import convert_lora_file
from flatlora_diffusion.lora.formats import read_safetensors, to_kohya
from flatlora_diffusion.lora.kohya_names import UnetLayout
from flatlora_diffusion.lora.load import load_lora_into_pipeline
from flatlora_diffusion.lora.lora_set import LoraFileError
from flatlora_diffusion.lora.save import lora_set_from_models, save_lora_files
from flatlora_diffusion.sdxl.published_configs import meta_sdxl_models
from tests.helpers import text_inputs, text_loss, unet_inputs, unet_loss
from tests.lora_helpers import assert_same_outputs, fresh_pipe, no_warnings_allowed, outputs

# Three different scales: linear 6/4, conv 3/2; random B so that no reload can pass as a no-op.
CONV_LORA = LoraOptions(rank=4, alpha=6.0, init="none", conv_rank=2, conv_alpha=3.0)
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def stem(key: str) -> str:
    return next(key.removesuffix(s) for s in KOHYA_SUFFIXES if key.endswith(s))


@pytest.fixture(scope="module")
def conv_trained(default_model_dir, tmp_path_factory):
    """(pipe, {"diffusers", "kohya"} paths, outputs): conv + linear LoRA, two AdamW steps of plain LoRA."""
    pipe = fresh_pipe(default_model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        add_unet_lora(pipe.unet, CONV_LORA)
        add_text_encoder_lora(pipe.text_encoder, CONV_LORA)
        add_text_encoder_lora(pipe.text_encoder_2, CONV_LORA)
    models = (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    optimizer = torch.optim.AdamW(lora_parameters(*models), lr=1e-2)
    for step in range(2):
        ids = text_inputs(seed=step)
        loss = unet_loss(pipe.unet, unet_inputs(pipe.unet, seed=step)) + text_loss(pipe.text_encoder, ids)
        (loss + text_loss(pipe.text_encoder_2, ids)).backward()
        optimizer.step()
        optimizer.zero_grad()
    paths = save_lora_files(tmp_path_factory.mktemp("conv_lora"), *models, lora=CONV_LORA)
    return pipe, paths, outputs(pipe)


def test_conv_lora_follows_kohya_locon_layout_on_the_tiny_unet(conv_trained):
    pipe, _, _ = conv_trained
    unet = lora_set_from_models(pipe.unet).modules["unet"]
    spatial = {n: m for n, m in unet.items() if m.spatial}
    # tiny UNet: 11 resnets (conv1, conv2), 2 downsamplers, 2 upsamplers; 7 conv_shortcut, 11 time_emb_proj
    assert len(spatial) == 26 and sum(n.endswith("downsamplers.0.conv") for n in spatial) == 2
    assert sum(n.endswith("upsamplers.0.conv") for n in spatial) == 2
    assert {(m.rank, m.alpha) for m in spatial.values()} == {(2, 3.0)}
    resnet_linear = {n: m for n, m in unet.items() if n.endswith(("conv_shortcut", "time_emb_proj"))}
    assert len(resnet_linear) == 18 and {(m.rank, m.alpha) for m in resnet_linear.values()} == {(4, 6.0)}
    assert not any(n in unet for n in ("conv_in", "conv_out"))  # outside kohya's conv blocks
    assert all(m.up.abs().sum() > 0 for m in unet.values())


def test_without_conv_rank_no_conv_module_gets_lora(default_model_dir):
    pipe = fresh_pipe(default_model_dir)
    add_unet_lora(pipe.unet, LoraOptions(rank=4, alpha=6.0))
    names = lora_set_from_models(pipe.unet).modules["unet"]
    assert names and not any("resnets" in n or "samplers" in n for n in names)


def test_conv_options_are_validated():
    with pytest.raises(ValueError, match="conv_alpha is set but conv_rank"):
        LoraOptions(conv_alpha=2.0)
    with pytest.raises(ValueError, match="conv_rank must be >= 1"):
        LoraOptions(conv_rank=0)
    assert LoraOptions(rank=4, conv_rank=8).rank_and_alpha(spatial=True) == (8, 8.0)


@pytest.mark.parametrize("kind", ["kohya", "diffusers"])
def test_each_file_reloads_exactly_with_load_lora_weights(conv_trained, default_model_dir, kind):
    _, paths, expected = conv_trained
    pipe = fresh_pipe(default_model_dir)
    with no_warnings_allowed():
        pipe.load_lora_weights(paths[kind].parent, weight_name=paths[kind].name)
    assert_same_outputs(pipe, expected)


def test_diffusers_metadata_patterns_are_the_conv_paths(conv_trained):
    _, paths, _ = conv_trained
    _, metadata = read_safetensors(paths["diffusers"])
    adapter = json.loads(metadata["lora_adapter_metadata"])
    assert (adapter["unet.r"], adapter["unet.lora_alpha"]) == (4, 6.0)
    assert len(adapter["unet.rank_pattern"]) == 26 and set(adapter["unet.rank_pattern"].values()) == {2}
    assert adapter["unet.alpha_pattern"]["down_blocks\\.0\\.downsamplers\\.0\\.conv"] == 3.0
    assert adapter["unet.alpha_pattern"].keys() == adapter["unet.rank_pattern"].keys()


@pytest.mark.parametrize("kind", ["kohya", "diffusers"])
def test_our_importer_reloads_either_file_exactly(conv_trained, default_model_dir, kind):
    _, paths, expected = conv_trained
    pipe = fresh_pipe(default_model_dir)
    with no_warnings_allowed():
        loaded = load_lora_into_pipeline(pipe, paths[kind])
    assert sum(m.spatial for _, _, m in loaded.items()) == 26
    assert_same_outputs(pipe, expected)


@pytest.mark.parametrize("kind", ["kohya", "diffusers"])
def test_converted_file_reloads_exactly(conv_trained, default_model_dir, tmp_path, kind):
    _, paths, expected = conv_trained
    source = paths["kohya" if kind == "diffusers" else "diffusers"]
    target = convert_lora_file(source, tmp_path / f"converted_{kind}.safetensors", kind, base=default_model_dir)
    a, _ = read_safetensors(paths[kind])
    b, _ = read_safetensors(target)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pipe = fresh_pipe(default_model_dir)
    load_lora_into_pipeline(pipe, target)
    assert_same_outputs(pipe, expected)


def test_kohya_conv_keys_shapes_alpha_and_metadata(conv_trained):
    _, paths, _ = conv_trained
    tensors, metadata = read_safetensors(paths["kohya"])
    op = "lora_unet_input_blocks_2_0_op"  # tiny UNet: one layer per down block, so the downsampler is 2
    assert tensors[f"{op}.lora_down.weight"].shape == (2, 48, 3, 3)
    assert tensors[f"{op}.lora_up.weight"].shape == (48, 2, 1, 1)
    assert tensors[f"{op}.alpha"].item() == 3.0
    skip = "lora_unet_input_blocks_3_0_skip_connection"
    assert tensors[f"{skip}.lora_down.weight"].shape == (4, 48, 1, 1) and tensors[f"{skip}.alpha"].item() == 6.0
    for name in ("input_blocks_1_0_in_layers_2", "input_blocks_1_0_out_layers_3", "middle_block_2_in_layers_2",
                 "output_blocks_1_2_conv", "output_blocks_3_2_conv", "output_blocks_0_0_emb_layers_1"):
        assert f"lora_unet_{name}.lora_down.weight" in tensors, name
    assert not any("down_blocks" in k or "up_blocks" in k for k in tensors)  # never mixed with diffusers names
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "6.0")
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "3.0"}


def test_export_refuses_conv_modules_trained_with_other_options(conv_trained, tmp_path):
    pipe, _, _ = conv_trained
    with pytest.raises(LoraFileError, match="rank 2, alpha 3.0 differ"):
        save_lora_files(tmp_path, pipe.unet, lora=LoraOptions(rank=4, alpha=6.0, conv_rank=2, conv_alpha=2.0))


# ---------------------------------------------------------------- the real SDXL layout (meta device)

def expected_sgm_locon_names() -> dict[str, str]:
    """{SGM module: kind} of a kohya LoCon on SDXL, written out from the SGM UNet's structure."""
    resblocks = ([f"input_blocks.{i}.0" for i in (1, 2, 4, 5, 7, 8)] + ["middle_block.0", "middle_block.2"]
                 + [f"output_blocks.{i}.0" for i in range(9)])
    names = {f"{r}.{child}": "3x3" for r in resblocks for child in ("in_layers.2", "out_layers.3")}
    names.update({f"{r}.emb_layers.1": "linear" for r in resblocks})
    names.update({f"{r}.skip_connection": "1x1" for r in resblocks if r in ("input_blocks.4.0", "input_blocks.7.0")
                  or r.startswith("output_blocks")})
    names.update({"input_blocks.3.0.op": "3x3", "input_blocks.6.0.op": "3x3",
                  "output_blocks.2.2.conv": "3x3", "output_blocks.5.2.conv": "3x3"})
    return names


@pytest.fixture(scope="module")
def real_sdxl_conv_kohya():
    unet = meta_sdxl_models()[0]
    add_unet_lora(unet, LoraOptions(rank=4, alpha=6.0, conv_rank=2, conv_alpha=3.0))
    lora_set = lora_set_from_models(unet)
    return lora_set, to_kohya(lora_set, UnetLayout.from_config(unet.config))


def test_real_sdxl_conv_modules_are_kohyas_66(real_sdxl_conv_kohya):
    lora_set, keys = real_sdxl_conv_kohya
    unet = lora_set.modules["unet"]
    assert len(unet) == 560 + 66
    assert sum(m.spatial for m in unet.values()) == 38
    assert sum(n.endswith("conv_shortcut") for n in unet) == 11 and sum(n.endswith("time_emb_proj") for n in unet) == 17
    expected = expected_sgm_locon_names()
    assert len(expected) == 66
    conv_stems = {stem(k) for k in keys if "_transformer_blocks_" not in k}
    assert conv_stems == {"lora_unet_" + n.replace(".", "_") for n in expected}
    for name, kind in expected.items():
        down = keys[f"lora_unet_{name.replace('.', '_')}.lora_down.weight"]
        assert {"3x3": 4, "1x1": 4, "linear": 2}[kind] == down.ndim, name
        assert down.shape[0] == (2 if kind == "3x3" else 4), name
        assert keys[f"lora_unet_{name.replace('.', '_')}.alpha"].item() == (3.0 if kind == "3x3" else 6.0)
    assert keys["lora_unet_input_blocks_4_0_in_layers_2.lora_down.weight"].shape == (2, 320, 3, 3)
    assert keys["lora_unet_input_blocks_4_0_in_layers_2.lora_up.weight"].shape == (640, 2, 1, 1)
    assert keys["lora_unet_output_blocks_2_2_conv.lora_down.weight"].shape == (2, 1280, 3, 3)


def test_diffusers_kohya_loader_maps_every_conv_key_to_the_real_sdxl_module(real_sdxl_conv_kohya):
    """An independent reading of our SGM names: diffusers' own kohya converter, on real SDXL's config."""
    _, keys = real_sdxl_conv_kohya
    wanted = {"lora_unet_" + n.replace(".", "_") for n in expected_sgm_locon_names()}
    small = {k: torch.zeros(t.shape) if not k.endswith(".alpha") else t for k, t in keys.items() if stem(k) in wanted}
    unet = meta_sdxl_models()[0]
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(small, unet_config=unet.config)
    modules = dict(unet.named_modules())
    parts = [(k.removeprefix("unet.").rsplit(".lora.", 1), t) for k, t in state.items()]  # <path>.lora.down.weight
    assert len({path for (path, _), _ in parts}) == 66 and len(parts) == 132
    for (path, role), tensor in parts:
        weight = modules[path].weight  # KeyError: a key that names no module of real SDXL
        if role == "down.weight":
            assert tensor.shape[1:] == weight.shape[1:], path
        else:
            assert role == "up.weight" and tensor.shape[0] == weight.shape[0], path
    assert len(alphas) == 66
