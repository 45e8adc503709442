"""Issue 16 items 1-4 end to end at 64 px: subsets, kohya folders, masked loss, disk latent cache,
caption dropout/shuffle; each one resumes exactly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from flatlora_diffusion.data.batches import BatchMaker
from flatlora_diffusion.training.cli import run_training
from flatlora_diffusion.training.metrics import read_metrics
from tests.training.test_training_script import args, assert_same_tensors, instance_dir, straight_and_resumed  # noqa: F401

LORA = "pytorch_lora_weights.safetensors"


def _photos(folder, names, seed=0, size=(80, 64)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def two_concepts(tmp_path_factory):
    """data.toml with a dog subset (prior preservation, loss weight 2) and a cat subset."""
    root = tmp_path_factory.mktemp("concepts")
    _photos(root / "dog", ["d1", "d2"], seed=1)
    _photos(root / "cat", ["c1"], seed=2)
    _photos(root / "class_dog", ["class_00000"], seed=3, size=(64, 64))
    (root / "data.toml").write_text(
        '[[subsets]]\nfolder = "dog"\nprompt = "a photo of sks dog"\nrepeats = 2\nloss_weight = 2.0\n'
        'class_folder = "class_dog"\nclass_prompt = "a photo of a dog"\nprior_loss_weight = 0.5\n\n'
        '[[subsets]]\nfolder = "cat"\nprompt = "a photo of zwx cat"\n')
    return root / "data.toml"


def dataset_args(model_dir, toml, out, *extra):
    argv = args(model_dir, "unused", out, "--dataset_config", toml, "--num_class_images", "1", *extra)
    for flag in ("--instance_data_dir", "--instance_prompt"):
        k = argv.index(flag)
        del argv[k:k + 2]
    return argv


def _record_batches(monkeypatch):
    seen = []
    original = BatchMaker.batch

    def record(self, stream, draws, generator):
        batch = original(self, stream, draws, generator)
        seen.append(([stream.examples[d.index] for d in draws], batch))
        return batch

    monkeypatch.setattr(BatchMaker, "batch", record)
    return seen


def test_dataset_config_trains_every_subset_with_its_weights(default_model_dir, two_concepts, tmp_path, monkeypatch):
    seen = _record_batches(monkeypatch)
    out = tmp_path / "run"
    assert run_training(dataset_args(default_model_dir, two_concepts, out, "--max_train_steps", "6",
                                     "--train_batch_size", "2")) == 0
    prompts = {e.prompt: float(w) for examples, batch in seen for e, w in zip(examples, batch.weights)}
    assert prompts == {"a photo of sks dog": 2.0, "a photo of zwx cat": 1.0, "a photo of a dog": 0.5}
    subsets = json.loads((out / "config.json").read_text())["subsets"]
    assert [(s["images"]["prompt"], s["images"]["repeats"], s["loss_weight"]) for s in subsets] == [
        ("a photo of sks dog", 2, 2.0), ("a photo of zwx cat", 1, 1.0)]
    assert subsets[0]["classes"]["folders"][0]["prompt"] == "a photo of a dog" and subsets[1]["classes"] is None


def test_dataset_config_resume_is_exact(default_model_dir, two_concepts, tmp_path):
    straight, resumed = straight_and_resumed(default_model_dir, two_concepts, tmp_path, "--random_flip",
                                             argv_of=dataset_args)
    assert_same_tensors(load_file(straight / LORA), load_file(resumed / LORA))


def test_kohya_parent_folder_trains_with_folder_repeats_and_prompts(default_model_dir, tmp_path, monkeypatch):
    _photos(tmp_path / "data" / "3_sks cat", ["a"])
    _photos(tmp_path / "data" / "1_zwx dog", ["b"])
    seen = _record_batches(monkeypatch)
    out = tmp_path / "run"
    assert run_training(args(default_model_dir, tmp_path / "data", out, "--max_train_steps", "4")) == 0
    assert [e.prompt for examples, _ in seen for e in examples].count("sks cat") == 3  # one epoch = 3 + 1
    subsets = json.loads((out / "config.json").read_text())["subsets"]
    assert [(s["images"]["repeats"], s["images"]["prompt"]) for s in subsets] == [(1, "zwx dog"), (3, "sks cat")]


def test_kohya_class_folders_are_used_as_they_are(default_model_dir, instance_dir, tmp_path, monkeypatch):  # noqa: F811
    _photos(tmp_path / "reg" / "1_a photo of a cat", ["r1"], size=(64, 64))
    _photos(tmp_path / "reg" / "2_a photo of an animal", ["r2"], size=(64, 64))
    seen = _record_batches(monkeypatch)
    argv = args(default_model_dir, instance_dir, tmp_path / "run", "--with_prior_preservation", "--class_data_dir",
                tmp_path / "reg", "--class_prompt", "unused", "--max_train_steps", "6", "--num_class_images", "50")
    assert run_training(argv) == 0
    prompts = [e.prompt for examples, _ in seen for e in examples]
    assert prompts.count("a photo of a cat") + prompts.count("a photo of an animal") == 6
    assert len(list((tmp_path / "reg").rglob("*.png"))) == 2  # nothing generated into regularisation folders


# ------------------------------------------------------------------ masked loss

@pytest.fixture
def masked_dir(instance_dir, tmp_path):  # noqa: F811
    folder = tmp_path / "masked"
    shutil.copytree(instance_dir, folder)
    for name in ("chelsea", "astronaut"):
        mask = np.zeros((72, 96), dtype=np.uint8)
        mask[10:60, 20:70] = 255
        Image.fromarray(mask).save(folder / f"{name}.mask.png")
    return folder


def _black_masks(folder):
    for path in folder.glob("*.png"):
        if not path.name.endswith(".mask.png"):
            Image.new("L", Image.open(path).size, 0).save(path.with_name(path.stem + ".mask.png"))


def test_black_masks_train_nothing_and_white_ones_do(default_model_dir, masked_dir, tmp_path, capsys):
    _black_masks(masked_dir)
    out = tmp_path / "black"
    flags = ("--masked_loss", "--adam_weight_decay", "0", "--flat_sigma", "0")
    assert run_training(args(default_model_dir, masked_dir, out, *flags)) == 0
    assert capsys.readouterr().out.count("masked loss: 3 of 3 instance images have a mask") == 1
    assert all(r["loss"] == 0 for r in read_metrics(out / "metrics.jsonl"))
    lora = load_file(out / LORA)
    assert all(t.abs().max() == 0 for k, t in lora.items() if "lora_B" in k)  # B starts at 0 and got no gradient
    for path in masked_dir.glob("*.mask.png"):
        Image.new("L", Image.open(path).size, 255).save(path)
    assert run_training(args(default_model_dir, masked_dir, tmp_path / "white", *flags)) == 0
    assert any(t.abs().max() > 0 for k, t in load_file(tmp_path / "white" / LORA).items() if "lora_B" in k)


def test_masked_loss_says_once_which_images_train_everywhere(default_model_dir, masked_dir, tmp_path, capsys):
    assert run_training(args(default_model_dir, masked_dir, tmp_path / "run", "--masked_loss")) == 0
    out = capsys.readouterr().out
    assert out.count("masked loss:") == 1 and "2 of 3 instance images have a mask; 1 train everywhere" in out


def test_masked_loss_resume_is_exact(default_model_dir, masked_dir, tmp_path):
    straight, resumed = straight_and_resumed(default_model_dir, masked_dir, tmp_path, "--masked_loss",
                                             "--random_flip", "--aspect_buckets", "--resolution", "128")
    assert_same_tensors(load_file(straight / LORA), load_file(resumed / LORA))


# ------------------------------------------------------------------ disk latent cache

def _count_vae(monkeypatch):
    from diffusers import AutoencoderKL

    calls = []
    original = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: calls.append(x.shape) or original(self, x, *a,
                                                                                                                **k))
    return calls


def test_disk_cache_is_reused_and_corrupt_entries_recomputed(default_model_dir, instance_dir, tmp_path,  # noqa: F811
                                                             monkeypatch):
    cache = tmp_path / "latents"
    flags = ("--cache_latents_to_disk", cache, "--random_flip", "--max_train_steps", "3")
    calls = _count_vae(monkeypatch)
    assert run_training(args(default_model_dir, instance_dir, tmp_path / "first", *flags)) == 0
    entries = sorted(cache.rglob("*.safetensors"))
    assert len(calls) == 3 and len(entries) == 3  # one entry per (image, crop, flip) drawn
    calls.clear()
    assert run_training(args(default_model_dir, instance_dir, tmp_path / "second", *flags)) == 0
    assert calls == []  # the VAE was not called at all
    assert_same_tensors(load_file(tmp_path / "first" / LORA), load_file(tmp_path / "second" / LORA))
    entries[0].write_bytes(entries[0].read_bytes()[:-7])
    entries[1].write_bytes(b"garbage")
    assert run_training(args(default_model_dir, instance_dir, tmp_path / "third", *flags)) == 0
    assert len(calls) == 2  # the two broken entries were recomputed, never used
    assert_same_tensors(load_file(tmp_path / "first" / LORA), load_file(tmp_path / "third" / LORA))
    calls.clear()
    assert run_training(args(default_model_dir, instance_dir, tmp_path / "bigger", *flags, "--resolution", "72")) == 0
    assert len(calls) == 3  # another size: other entries


def test_disk_cache_resume_is_exact_and_skips_the_vae(default_model_dir, instance_dir, tmp_path,  # noqa: F811
                                                     monkeypatch):
    calls = _count_vae(monkeypatch)
    straight, resumed = straight_and_resumed(default_model_dir, instance_dir, tmp_path, "--cache_latents_to_disk",
                                             tmp_path / "latents", "--random_flip", "--aspect_buckets",
                                             "--resolution", "128")
    assert_same_tensors(load_file(straight / LORA), load_file(resumed / LORA))
    shapes = {tuple(c[-2:]) for c in calls}
    assert len(calls) == len(list((tmp_path / "latents").rglob("*.safetensors")))  # the resumed run: all hits
    assert shapes and all(h * w <= 128 * 128 and h % 64 == 0 and w % 64 == 0 for h, w in shapes)


# ------------------------------------------------------------------ captions

@pytest.fixture
def tagged_dir(instance_dir, tmp_path):  # noqa: F811
    folder = tmp_path / "tagged"
    shutil.copytree(instance_dir, folder)
    for name in ("chelsea", "astronaut", "coffee"):
        (folder / f"{name}.txt").write_text(f"sks, {name}, photo, colourful, detailed\n")
    return folder


def test_shuffled_captions_keep_the_trigger_first_and_drop_to_zeros(default_model_dir, tagged_dir, tmp_path,
                                                                    monkeypatch):
    seen = []
    original = BatchMaker.embeds
    monkeypatch.setattr(BatchMaker, "embeds", lambda self, prompts: seen.extend(prompts) or original(
        self, prompts))
    assert run_training(args(default_model_dir, tagged_dir, tmp_path / "run", "--shuffle_caption", "--keep_tokens",
                             "2", "--caption_dropout_rate", "0.3", "--max_train_steps", "12")) == 0
    kept = [p for p in seen if p]
    assert len(kept) < len(seen) and len(kept) > 0
    assert all(p.split(", ")[0] == "sks" for p in kept) and len(set(kept)) > 3


def test_caption_options_resume_is_exact(default_model_dir, tagged_dir, tmp_path):
    straight, resumed = straight_and_resumed(default_model_dir, tagged_dir, tmp_path, "--shuffle_caption",
                                             "--keep_tokens", "1", "--caption_dropout_rate", "0.5",
                                             "--train_text_encoder")
    assert_same_tensors(load_file(straight / LORA), load_file(resumed / LORA))


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("case", ["conflict", "unknown key", "empty subset", "no masks", "missing config",
                                  "cache is a file"])
def test_bad_data_options_give_one_clear_line(case, default_model_dir, instance_dir, tmp_path, capsys):  # noqa: F811
    toml = tmp_path / "data.toml"
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    cases = {
        "conflict": (args(default_model_dir, instance_dir, out, "--dataset_config", toml), "--instance_data_dir"),
        "unknown key": (dataset_args(default_model_dir, toml, out), "unknown key(s) repeat"),
        "empty subset": (dataset_args(default_model_dir, toml, out), "empty"),
        "no masks": (args(default_model_dir, instance_dir, out, "--masked_loss"), "no instance image has a mask"),
        "missing config": (dataset_args(default_model_dir, tmp_path / "nope.toml", out), "not found"),
        "cache is a file": (args(default_model_dir, instance_dir, out, "--cache_latents_to_disk", toml),
                            "is not a folder"),
    }
    toml.write_text('[[subsets]]\nfolder = "empty"\nprompt = "x"\n' + ("repeat = 2\n" if case == "unknown key" else ""))
    argv, expected = cases[case]
    assert run_training(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expected in err[0], err
    assert not out.exists()
