"""train_dreambooth_flat.py end to end at 64 px, a few steps each (issue 4)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import warnings

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import flatlora_diffusion.training.loop as training
from flatlora_diffusion.data.batches import BatchMaker
from flatlora_diffusion.training.cli import run_training
from flatlora_diffusion.training.metrics import read_metrics


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    """Three small real photos (scikit-image's bundled CC0 images), different aspect ratios."""
    from skimage import data

    folder = tmp_path_factory.mktemp("instance")
    for name in ("chelsea", "astronaut", "coffee"):
        Image.fromarray(getattr(data, name)()).resize((96, 72)).save(folder / f"{name}.png")
    return folder


def args(model_dir, instance_dir, out, *extra):
    return ["--pretrained_model_name_or_path", str(model_dir), "--instance_data_dir", str(instance_dir),
            "--instance_prompt", "a photo of sks cat", "--resolution", "64", "--output_dir", str(out),
            "--max_train_steps", "2", "--rank", "4", "--lora_alpha", "6", "--learning_rate", "1e-3",
            "--validation_inference_steps", "2", "--num_validation_images", "1", *map(str, extra)]


def test_plain_run_writes_every_output_and_loads_in_diffusers(default_model_dir, instance_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "run"
    assert run_training(args(default_model_dir, instance_dir, out, "--validation_prompt", "a sks cat")) == 0
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors", "README.md",
                 "config.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert {"loss", "lr", "sigma_t", "seconds"} <= rows[0].keys() and rows[-1]["sigma_t"] == pytest.approx(0.1)
    assert json.loads((out / "config.json").read_text())["flat_sigma"] == 0.1
    samples = sorted((out / "samples").glob("final_*.png"))
    assert len(samples) == 1 and Image.open(samples[0]).size == (64, 128)  # base row over LoRA row
    card = (out / "README.md").read_text()
    assert "sks" in card and "ComfyUI" in card and "A1111" in card and "load_lora_weights" in card
    pipe = StableDiffusionXLPipeline.from_pretrained(default_model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.load_lora_weights(out)
    assert not list(out.glob(".*tmp*"))


def test_prior_preservation_generates_class_images(default_model_dir, instance_dir, tmp_path):
    class_dir = tmp_path / "class"
    code = run_training(args(default_model_dir, instance_dir, tmp_path / "run", "--with_prior_preservation",
                             "--class_data_dir", class_dir, "--class_prompt", "a photo of a cat",
                             "--num_class_images", "3", "--sample_batch_size", "2"))
    assert code == 0
    images = sorted(class_dir.glob("*.png"))
    assert len(images) == 3 and all(Image.open(p).size == (64, 64) for p in images)


def test_text_encoder_training_exports_text_encoder_keys(default_model_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    assert run_training(args(default_model_dir, instance_dir, out, "--train_text_encoder",
                             "--text_encoder_lr", "5e-4")) == 0
    keys = load_file(out / "pytorch_lora_weights.safetensors").keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("text_encoder_2.") for k in keys)
    kohya = load_file(out / "pytorch_lora_weights_kohya.safetensors").keys()
    assert any(k.startswith("lora_te1_") for k in kohya) and any(k.startswith("lora_te2_") for k in kohya)


def test_captions_override_the_instance_prompt(default_model_dir, instance_dir, tmp_path, monkeypatch):
    folder = tmp_path / "captioned"
    shutil.copytree(instance_dir, folder)
    (folder / "coffee.txt").write_text("a sks cup of coffee\n")
    seen = []
    original = BatchMaker.embeds
    monkeypatch.setattr(BatchMaker, "embeds",
                        lambda self, prompts: seen.extend(prompts) or original(self, prompts))
    assert run_training(args(default_model_dir, folder, tmp_path / "run", "--max_train_steps", "3",
                             "--train_batch_size", "2")) == 0
    assert "a sks cup of coffee" in seen and "a photo of sks cat" in seen


def test_accumulation_with_checkpoint_limit(default_model_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    assert run_training(args(default_model_dir, instance_dir, out, "--max_train_steps", "4",
                             "--gradient_accumulation_steps", "2", "--checkpointing_steps", "1",
                             "--checkpoints_total_limit", "2")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert json.loads((out / "checkpoint-4" / "state.json").read_text())["step"] == 4


def _lora(out):
    return load_file(out / "pytorch_lora_weights.safetensors")


def straight_and_resumed(model_dir, data_dir, tmp_path, *extra, argv_of=args):
    """Train 4 steps straight (checkpoint at 2), then resume a copy of checkpoint-2 to 4 elsewhere.

    `argv_of(model_dir, data_dir, out, *extra)` builds the command line (default: `args`)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_training(argv_of(model_dir, data_dir, straight, "--max_train_steps", "4", "--checkpointing_steps", "2",
                                *extra)) == 0
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    assert run_training(argv_of(model_dir, data_dir, resumed, "--max_train_steps", "4", "--checkpointing_steps", "2",
                                *extra, "--resume_from_checkpoint", "latest")) == 0
    return straight, resumed


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_exact(default_model_dir, instance_dir, tmp_path):
    """N steps, stop, resume to 2N == 2N straight (CPU, fp32), with flips, random crops and dropout."""
    straight, resumed = straight_and_resumed(default_model_dir, instance_dir, tmp_path, "--random_flip",
                                             "--lora_dropout", "0.1", "--lr_scheduler", "cosine",
                                             "--lr_warmup_steps", "1", "--train_text_encoder")
    assert_same_tensors(_lora(straight), _lora(resumed))
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [3, 4]


def test_sigterm_saves_a_checkpoint_and_resume_finishes(default_model_dir, instance_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = training.record

    def record_then_signal(run, log, step, *rest):
        original(run, log, step, *rest)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(training, "record", record_then_signal)
    assert run_training(args(default_model_dir, instance_dir, out, "--max_train_steps", "3")) == 130
    assert (out / "checkpoint-2").is_dir() and not (out / "pytorch_lora_weights.safetensors").exists()
    monkeypatch.setattr(training, "record", original)
    assert run_training(args(default_model_dir, instance_dir, out, "--max_train_steps", "3",
                             "--resume_from_checkpoint", "latest")) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()


# ------------------------------------------------------------------ bad input

def _bad_inputs(tmp_path, model_dir, instance_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "notes.txt").write_text("hello")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(instance_dir, corrupt)
    (corrupt / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    not_sdxl = tmp_path / "not_sdxl"
    not_sdxl.mkdir()
    (not_sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                            "unet": ["diffusers", "UNet2DConditionModel"]}))
    toml = tmp_path / "bad.toml"
    toml.write_text('resolution = 64\nlearning_rte = 1e-4\n')
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "pytorch_lora_weights.safetensors").write_bytes(b"precious")
    out = tmp_path / "out"
    base = lambda d=instance_dir, o=out: args(model_dir, d, o)  # noqa: E731
    return {
        "missing folder": (base(tmp_path / "nope"), "not found"),
        "empty folder": (base(empty), "empty"),
        "no images": (base(texts), "no images"),
        "corrupt image": (base(corrupt), "broken.jpg"),
        "wrong model path": (base() + ["--pretrained_model_name_or_path", str(tmp_path / "no_model")], "not found"),
        "non-SDXL model": (base() + ["--pretrained_model_name_or_path", str(not_sdxl)], "not an SDXL model"),
        "resolution": (base() + ["--resolution", "60"], "multiple of 8"),
        "unknown config key": (base() + ["--config", str(toml)], "learning_rte"),
        "class folder without prompt": (base() + ["--class_data_dir", str(empty)], "--class_prompt"),
        "output holds another run": (base(o=busy), "another run"),
    }


@pytest.mark.parametrize("case", ["missing folder", "empty folder", "no images", "corrupt image", "wrong model path",
                                  "non-SDXL model", "resolution", "unknown config key", "class folder without prompt",
                                  "output holds another run"])
def test_bad_input_gives_one_clear_line(case, default_model_dir, instance_dir, tmp_path, capsys):
    argv, expected = _bad_inputs(tmp_path, default_model_dir, instance_dir)[case]
    assert run_training(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expected in err[0], err
    assert not (tmp_path / "out").exists()
    busy = tmp_path / "busy" / "pytorch_lora_weights.safetensors"
    assert busy.read_bytes() == b"precious"


def test_unknown_flag_is_refused(default_model_dir, instance_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_training(args(default_model_dir, instance_dir, tmp_path / "o", "--learning_rte", "1"))
    assert stop.value.code == 2 and "learning_rte" in capsys.readouterr().err


def test_config_file_sets_flags_and_command_line_wins(tmp_path):
    from flatlora_diffusion.training.config import parse_config

    toml = tmp_path / "c.toml"
    toml.write_text('instance_data_dir = "x"\ninstance_prompt = "a sks"\nrank = 8\nlearning_rate = 2e-4\n'
                    'validation_prompt = ["a", "b"]\nflat_sigma = 0\n')
    config = parse_config(["--config", str(toml), "--rank", "16"])
    got = (config.rank, config.learning_rate, config.validation_prompt, config.flat_sigma)
    assert got == (16, 2e-4, ["a", "b"], 0.0)
    assert config.alpha == 16.0 and config.noise_seed == config.seed


def test_centre_crop_caches_latents_so_each_image_is_read_once_per_flip(default_model_dir, instance_dir, tmp_path,
                                                                        monkeypatch):
    import flatlora_diffusion.data.batches as batches

    reads = []
    original = batches.load_rgb
    monkeypatch.setattr(batches, "load_rgb", lambda path: reads.append(path.name) or original(path))
    assert run_training(args(default_model_dir, instance_dir, tmp_path / "run", "--center_crop", "--random_flip",
                             "--max_train_steps", "12")) == 0
    assert len(reads) <= 2 * 3 and len(set(reads)) == 3  # 12 samples of 3 images, at most 2 flips each
