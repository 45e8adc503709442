"""Issue 3: exported LoRA files reproduce the trained model wherever they are loaded."""

from __future__ import annotations

import json

import pytest
import torch

from flatlora_diffusion import FlatLora
from flatlora_diffusion.lora.attach import LoraOptions, lora_parameters
from flatlora_diffusion.lora.formats import read_safetensors, write_safetensors
from flatlora_diffusion.lora.load import load_lora_into_pipeline
from flatlora_diffusion.lora.lora_set import LoraFileError
from flatlora_diffusion.lora.save import save_lora_files
from tests.helpers import TEST_LORA, unet_inputs, unet_loss
from tests.lora_helpers import METADATA, assert_same_outputs, fresh_pipe, no_warnings_allowed, outputs, trained_export  # noqa: F401


@pytest.fixture
def trained(default_model_dir, tmp_path_factory):
    return trained_export(default_model_dir, tmp_path_factory)


def test_training_moved_the_lora_away_from_its_start(trained):
    pipe, *_ = trained
    assert all(p.abs().sum() > 0 for p in lora_parameters(pipe.unet, pipe.text_encoder, pipe.text_encoder_2))


def test_files_are_written_with_the_standard_names(trained):
    _, folder, paths, _ = trained
    assert paths == {"diffusers": folder / "pytorch_lora_weights.safetensors",
                     "kohya": folder / "pytorch_lora_weights_kohya.safetensors"}
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in paths.values())  # no temp files


def test_diffusers_file_reloads_exactly_with_load_lora_weights(trained, default_model_dir):
    _, folder, _, expected = trained
    pipe = fresh_pipe(default_model_dir)
    with no_warnings_allowed():
        pipe.load_lora_weights(folder)
    assert_same_outputs(pipe, expected)


@pytest.mark.parametrize("kind", ["kohya", "diffusers"])
def test_our_importer_reloads_either_file_exactly(trained, default_model_dir, kind):
    _, _, paths, expected = trained
    pipe = fresh_pipe(default_model_dir)
    with no_warnings_allowed():
        load_lora_into_pipeline(pipe, paths[kind])
    assert_same_outputs(pipe, expected)


def test_diffusers_adapter_metadata_is_the_portable_subset(trained):
    _, _, paths, _ = trained
    _, metadata = read_safetensors(paths["diffusers"])
    adapter = json.loads(metadata["lora_adapter_metadata"])
    for component in ("unet", "text_encoder", "text_encoder_2"):
        fields = {k.rsplit(".", 1)[1] for k in adapter if k.rsplit(".", 1)[0] == component}
        assert fields == {"r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern"}
        assert adapter[f"{component}.r"] == 4 and adapter[f"{component}.lora_alpha"] == 6.0
        assert adapter[f"{component}.rank_pattern"] == {} and adapter[f"{component}.alpha_pattern"] == {}


def test_text_encoder_keys_carry_text_model_prefix_in_both_files(trained):
    _, _, paths, _ = trained
    diffusers, _ = read_safetensors(paths["diffusers"])
    kohya, _ = read_safetensors(paths["kohya"])
    te = [k for k in diffusers if k.startswith("text_encoder")]
    assert te and all(k.split(".", 1)[1].startswith("text_model.encoder.layers.") for k in te)
    te = [k for k in kohya if k.startswith("lora_te")]
    assert te and all(k[len("lora_te1_"):].startswith("text_model_encoder_layers_") for k in te)
    assert {k[:8] for k in te} == {"lora_te1", "lora_te2"}


def test_metadata_is_kohya_modelspec_and_ours(trained):
    _, _, paths, _ = trained
    for path in paths.values():
        _, metadata = read_safetensors(path)
        assert all(isinstance(v, str) for v in metadata.values())
        assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
        assert metadata["ss_network_module"] == "networks.lora"
        assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "6.0")
        assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
        assert metadata["modelspec.title"] == "test run"
        for key in ("ss_training_started_at", "ss_steps", "ss_learning_rate", "ss_resolution", "ss_seed",
                    "flatlora_sigma", "flatlora_schedule", "flatlora_seed", "flatlora_diffusion_version"):
            assert metadata[key], key
        settings = (metadata["flatlora_sigma"], metadata["flatlora_schedule"], metadata["ss_steps"])
        assert settings == ("0.1", "constant", "3")


def test_export_inside_perturb_equals_export_outside(trained, tmp_path):
    pipe = trained[0]
    models = [pipe.unet, pipe.text_encoder, pipe.text_encoder_2]
    flat = FlatLora(models, sigma=0.5, schedule="constant", seed=3)
    outside = save_lora_files(tmp_path / "outside", *models, lora=TEST_LORA, metadata=METADATA)
    with flat.perturb(0):
        unet_loss(pipe.unet, unet_inputs(pipe.unet)).backward()  # the noise is live in the forward
        inside = save_lora_files(tmp_path / "inside", *models, lora=TEST_LORA, metadata=METADATA)
    for param in lora_parameters(*models):
        param.grad = None  # the trained pipe is shared: leave it as found
    for kind in ("diffusers", "kohya"):
        a, meta_a = read_safetensors(outside[kind])
        b, meta_b = read_safetensors(inside[kind])
        assert meta_a == meta_b and a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(trained, tmp_path, monkeypatch):
    pipe, _, _, _ = trained
    models = [pipe.unet, pipe.text_encoder, pipe.text_encoder_2]
    paths = save_lora_files(tmp_path, *models, lora=TEST_LORA)
    before = {k: p.read_bytes() for k, p in paths.items()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("flatlora_diffusion.lora.formats.save_file", fail)
    with pytest.raises(OSError):
        save_lora_files(tmp_path, *models, lora=TEST_LORA, metadata={"ss_steps": "9"})
    assert {k: p.read_bytes() for k, p in paths.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())


def test_fp16_export_and_option_checks(trained, tmp_path):
    pipe, _, _, _ = trained
    paths = save_lora_files(tmp_path, pipe.unet, lora=TEST_LORA, dtype=torch.float16)
    tensors, metadata = read_safetensors(paths["kohya"])
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    assert all(k.startswith("lora_unet_") for k in tensors) and metadata["ss_network_train_unet_only"] == "True"
    with pytest.raises(LoraFileError, match="differ from the LoraOptions"):
        save_lora_files(tmp_path / "x", pipe.unet, lora=LoraOptions(rank=4, alpha=4.0))
    with pytest.raises(LoraFileError, match="reserved"):
        save_lora_files(tmp_path / "y", pipe.unet, lora=TEST_LORA, metadata={"format": "x"})


def test_imported_file_continues_training(trained, default_model_dir, tmp_path):
    source, _, paths, expected = trained
    pipe = fresh_pipe(default_model_dir)
    load_lora_into_pipeline(pipe, paths["kohya"], trainable=True)
    params = lora_parameters(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    assert len(params) == len(lora_parameters(source.unet, source.text_encoder, source.text_encoder_2)) == 144
    assert all(p.dtype == torch.float32 for p in params)
    assert not any(p.requires_grad for n, p in pipe.unet.named_parameters() if "lora_" not in n)
    # Re-exported unchanged, the file is bit-identical in content.
    again = save_lora_files(tmp_path, pipe.unet, pipe.text_encoder, pipe.text_encoder_2, lora=TEST_LORA)
    a, _ = read_safetensors(paths["kohya"])
    b, _ = read_safetensors(again["kohya"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    optimizer = torch.optim.SGD(params, lr=1e-2)
    unet_loss(pipe.unet, unet_inputs(pipe.unet)).backward()
    optimizer.step()
    assert not torch.equal(outputs(pipe)["unet"], expected["unet"])


def test_diffusers_file_without_adapter_metadata_means_alpha_equal_rank(trained, default_model_dir, tmp_path):
    # Files from other diffusers trainers carry no alpha: both loaders read them with scale 1.
    _, _, paths, expected = trained
    tensors, _ = read_safetensors(paths["diffusers"])
    folded = {k: v * 1.5 if k.endswith("lora_B.weight") else v for k, v in tensors.items()}  # alpha/rank = 6/4
    plain = write_safetensors(tmp_path / "pytorch_lora_weights.safetensors", folded, {"format": "pt"})
    for load in (lambda pipe: pipe.load_lora_weights(tmp_path), lambda pipe: load_lora_into_pipeline(pipe, plain)):
        pipe = fresh_pipe(default_model_dir)
        load(pipe)
        assert_same_outputs(pipe, expected)
