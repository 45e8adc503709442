"""Issue 14: what a run writes can be read by other users, carries no local path, and is never NaN."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors import safe_open

from flatlora_diffusion.lora.lora_set import LoraFileError
from flatlora_diffusion.lora.save import save_lora_files
from flatlora_diffusion.sdxl.models import shareable_model_name
from flatlora_diffusion.training.cli import run_training
from tests.helpers import TEST_LORA
from tests.lora.hostile_files import lora_of_random_weights
from tests.training.test_nonfinite import photos  # noqa: F401  (a fixture)
from tests.training.test_training_script import args


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_run_outputs_are_0644_and_name_the_base_without_its_path(default_model_dir, photos, tmp_path,  # noqa: F811
                                                                 umask_022):
    out = tmp_path / "run"
    assert run_training(args(default_model_dir, photos, out, "--checkpointing_steps", "2",
                             "--validation_prompt", "a sks cat")) == 0
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors",
                                       "README.md", "config.json", "metrics.jsonl", "lora_params.safetensors"}
    assert {p.relative_to(out).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == \
        {p.relative_to(out).as_posix(): "0o644" for p in files}
    folders = [out, out / "checkpoint-2", out / "samples"]
    assert [oct(stat.S_IMODE(p.stat().st_mode)) for p in folders] == ["0o755"] * 3
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        with safe_open(str(out / name), framework="pt") as f:
            metadata = f.metadata()
        assert metadata["ss_sd_model_name"] == default_model_dir.name
        assert not [k for k, v in metadata.items() if str(default_model_dir.parent) in v], name
    card = (out / "README.md").read_text()
    assert f"base_model: {default_model_dir.name}\n" in card and str(default_model_dir.parent) not in card


def test_shareable_name_is_the_hub_id_or_the_folder_name(tmp_path):
    hub_id = "stabilityai/stable-diffusion-xl-base-1.0"
    assert shareable_model_name(hub_id) == hub_id
    (tmp_path / "my-sdxl").mkdir()
    assert shareable_model_name(str(tmp_path / "my-sdxl")) == "my-sdxl"
    assert shareable_model_name(str(tmp_path / "my-sdxl") + "/") == "my-sdxl"


def test_nan_weights_are_never_written_over_good_files(default_model_dir, tmp_path):
    pipe, paths = lora_of_random_weights(default_model_dir, tmp_path, text_encoders=False)
    before = {kind: path.read_bytes() for kind, path in paths.items()}
    name, param = next((n, p) for n, p in pipe.unet.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        param[0, 0] = float("inf")
    module = name.split(".lora_B")[0]
    with pytest.raises(LoraFileError, match=f"non-finite .* first in unet {module}; the LoRA files in .* were not"):
        save_lora_files(tmp_path, pipe.unet, lora=TEST_LORA)
    assert {kind: path.read_bytes() for kind, path in paths.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())


def test_config_json_still_records_the_full_path_for_this_machine(default_model_dir, photos, tmp_path):  # noqa: F811
    # config.json stays on the trainer's machine (resume and the app read it); it keeps the resolved path.
    out = tmp_path / "run"
    assert run_training(args(default_model_dir, photos, out)) == 0
    assert json.loads((out / "config.json").read_text())["pretrained_model_name_or_path"] == str(default_model_dir)
