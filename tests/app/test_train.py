"""Issue 17: the app trains too (TOML writer, safe uploads, the form, prompts, live progress).

The launcher on real processes is in test_train_runs.py, the browser in test_train_browser.py.
"""

from __future__ import annotations

import json
import math
import tomllib

import pytest
from PIL import Image

from app import live, toml_writer
from app.launcher import RUN_TOML, TRAIN_LOG, TRAIN_PID, Launcher
from app.runs import AppError, LoraSource, suggested_prompt
from app.train_form import create_run
from app.uploads import chosen_folder, image_folders, safe_name, store_uploads
from flatlora_diffusion.lora.formats import DIFFUSERS_FILE
from flatlora_diffusion.training.config import parse_config
from tests.app.train_helpers import png, quick_form

# ---------------------------------------------------------------- TOML writer


def test_toml_writer_round_trips_every_value_type():
    values = {"instance_prompt": 'a "sks" dog\\ on\ttwo\nlines \x01 ünïcode', "rank": 4, "learning_rate": 1e-05,
              "flat_sigma": 0.1, "train_text_encoder": True, "center_crop": False,
              "validation_prompt": ["one", 'two "quoted"'], "seed": -3, "big": 1e300, "tiny": 5e-324}
    text = toml_writer.dumps(values)
    assert tomllib.loads(text) == values
    assert [type(v) for v in tomllib.loads(text).values()] == [type(v) for v in values.values()]


@pytest.mark.parametrize("values, match", [({"x": None}, "cannot write"), ({"x": math.nan}, "finite"),
                                           ({"x": {"a": 1}}, "cannot write"), ({"x": [1, 2]}, "cannot write"),
                                           ({"a b": 1}, "bare TOML key"), ({"x\n=1": 1}, "bare TOML key")])
def test_toml_writer_refuses_what_it_cannot_write_exactly(values, match):
    with pytest.raises(ValueError, match=match):
        toml_writer.dumps(values)


# ---------------------------------------------------------------- uploads and folders


@pytest.mark.parametrize("name, safe", [("../../etc/passwd", "passwd"), ("..", "file"), ("", "file"),
                                        (".bashrc", "bashrc"), ("C:\\Users\\me\\cat 1?.png", "cat_1_.png"),
                                        ("photo.PNG", "photo.PNG"), ("a/../../b.jpg", "b.jpg")])
def test_safe_names_are_plain_file_names(name, safe):
    assert safe_name(name) == safe


def test_uploads_are_moved_under_the_root_with_safe_distinct_names(root, tmp_path):
    uploads = [png(tmp_path / "up1" / "../x.png"), png(tmp_path / "up2" / "x.png"),
               png(tmp_path / "up3" / "we ird.jpg")]
    dest = root / "run" / "instance_images"
    stored = store_uploads(uploads, dest, root)
    assert [p.name for p in stored] == ["x.png", "x_2.png", "we_ird.jpg"]
    assert all(p.parent == dest.resolve() and p.is_file() for p in stored)
    assert not any(p.exists() for p in uploads)  # moved: the only copy is under the runs root


@pytest.mark.parametrize("name, data, match", [
    ("notes.txt", b"hello", "not an image file"),
    ("fake.png", b"MZ\x90\x00 an executable", "not a readable image"),
    ("anim.gif", None, "not an image file"),
    ("disguised.png", "gif", "GIF file; only"),
])
def test_only_real_images_are_accepted_and_nothing_is_stored_on_refusal(root, tmp_path, name, data, match):
    bad = tmp_path / name
    if data is None or data == "gif":
        Image.new("RGB", (8, 8)).save(bad, format="GIF")
    else:
        bad.write_bytes(data)
    good = png(tmp_path / "good.png")
    dest = root / "run" / "instance_images"
    with pytest.raises(AppError, match=match):
        store_uploads([good, bad], dest, root)
    assert not dest.exists() and good.exists()


def test_folders_from_the_form_must_lie_under_the_root(root, tmp_path):
    png(tmp_path / "outside" / "a.png")
    (root / "link").symlink_to(tmp_path / "outside")
    (root / "empty").mkdir()
    assert chosen_folder("photos", root) == (root / "photos").resolve()
    for choice in ("../outside", str(tmp_path / "outside"), "link", "photos/../../outside"):
        with pytest.raises(AppError, match="outside the runs folder"):
            chosen_folder(choice, root)
    with pytest.raises(AppError, match="no images"):
        chosen_folder("empty", root)
    with pytest.raises(AppError, match="outside the runs folder"):
        store_uploads([png(tmp_path / "u.png")], root / ".." / "escape", root)
    assert image_folders(root) == ["photos"]  # the symlink out is not offered


# ---------------------------------------------------------------- the form


def test_the_form_becomes_a_run_toml_the_trainer_reads(root, default_model_dir):
    form = quick_form(run_name="../My Run!", train_text_encoder=True, text_encoder_lr=5e-4, validation_steps=0.0,
                      class_prompt="a photo of a cat", prior_preservation=True, num_class_images=3.0)
    folder = create_run(root, form, None, str(default_model_dir))
    assert folder == (root / "My_Run").resolve() and sorted(p.name for p in folder.iterdir()) == [RUN_TOML]
    config = parse_config(["--config", str(folder / RUN_TOML)])  # the trainer's own parser accepts it
    assert (config.output_dir, config.instance_data_dir) == (str(folder), str((root / "photos").resolve()))
    assert (config.max_train_steps, config.rank, config.lora_alpha, config.resolution) == (40, 4, 6.0, 64)
    assert (config.text_encoder_lr, config.validation_steps, config.num_class_images) == (5e-4, None, 3)
    assert config.with_prior_preservation and config.class_data_dir == str(folder / "class_images")
    assert config.validation_prompt == ["a sks cat on a sofa"]
    assert config.pretrained_model_name_or_path == str(default_model_dir)
    with pytest.raises(AppError, match="already exists"):
        create_run(root, form, None, str(default_model_dir))


def test_a_refused_form_leaves_no_folder(root, tmp_path):
    with pytest.raises(AppError, match="not an image file"):
        create_run(root, quick_form(run_name="r"), [tmp_path / "x.txt"], "base")
    with pytest.raises(AppError, match="instance prompt"):
        create_run(root, quick_form(run_name="r", instance_prompt=" "), None, "base")
    with pytest.raises(AppError, match="outside the runs folder"):
        create_run(root, quick_form(run_name="r", image_folder="/etc"), None, "base")
    assert sorted(p.name for p in root.iterdir()) == ["photos"]


def test_uploads_go_into_the_run_folder(root, tmp_path):
    folder = create_run(root, quick_form(run_name="up", image_folder=""), [png(tmp_path / "a b.png")], "base")
    values = tomllib.loads((folder / RUN_TOML).read_text())
    assert values["instance_data_dir"] == str(folder / "instance_images")
    assert [p.name for p in (folder / "instance_images").iterdir()] == ["a_b.png"]
    assert values["validation_prompt"] == ["a sks cat on a sofa"] and "text_encoder_lr" not in values


# ---------------------------------------------------------------- prompts and live state


def test_the_suggested_prompt_is_the_validation_then_the_instance_prompt(tmp_path):
    import torch

    from flatlora_diffusion.lora.formats import write_safetensors

    run = tmp_path / "run"
    run.mkdir()
    lora = write_safetensors(run / DIFFUSERS_FILE, {"x": torch.zeros(1)}, {"instance_prompt": "meta prompt"})
    source = LoraSource("run", lora, run)
    (run / "config.json").write_text(json.dumps({"validation_prompt": ["first", "second"], "instance_prompt": "i"}))
    assert suggested_prompt(source) == "first"
    (run / "config.json").write_text(json.dumps({"validation_prompt": [], "instance_prompt": "a sks shape"}))
    assert suggested_prompt(source) == "a sks shape"
    (run / "config.json").write_text("{broken")
    assert suggested_prompt(source) == "meta prompt"
    assert suggested_prompt(LoraSource("file: x", lora)) == "meta prompt"
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert suggested_prompt(LoraSource("file: junk", tmp_path / "junk.safetensors")) is None


def test_generate_prompt_defaults_to_the_selected_runs_prompt(tmp_path):
    import torch

    from app.callbacks import Studio
    from app.ui import Handlers
    from flatlora_diffusion.lora.formats import write_safetensors

    run = tmp_path / "run"
    run.mkdir()
    write_safetensors(run / DIFFUSERS_FILE, {"x": torch.zeros(1)}, {})
    (run / "config.json").write_text(json.dumps({"validation_prompt": ["a sks shape on a blue background"]}))
    handlers = Handlers(Studio("unused-base", tmp_path, device="cpu"))  # the base is never loaded here
    assert handlers.default_prompt("run", "a photo of sks cat") == "a sks shape on a blue background"
    assert handlers.default_prompt("gone", "typed") == "typed" and handlers.default_prompt(None, "typed") == "typed"


def test_the_trainer_accepts_a_folder_holding_only_the_apps_launch_files(root, default_model_dir):
    from flatlora_diffusion.errors import UserError
    from flatlora_diffusion.training.preflight import check_output_dir

    folder = create_run(root, quick_form(run_name="r", image_folder=""), [png(root / "up.png")], "base")
    (folder / TRAIN_LOG).write_text("")
    (folder / TRAIN_PID).write_text("{}")
    check_output_dir(parse_config(["--config", str(folder / RUN_TOML)]))  # no error: a new run
    (folder / "notes.txt").write_text("another run's file")
    with pytest.raises(UserError, match="another run"):
        check_output_dir(parse_config(["--config", str(folder / RUN_TOML)]))


def test_progress_is_read_from_the_run_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_TOML).write_text("max_train_steps = 50\n")
    launcher = Launcher(tmp_path)
    assert live.read_progress(run, launcher).state == "new"
    rows = [{"step": s, "loss": 0.5, "sigma_t": 0.1, "seconds": 2.0 if s != 3 else 90.0} for s in range(1, 11)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 11, "lo')
    (run / TRAIN_LOG).write_text("# flatlora app: 1\nerror: old attempt\n# flatlora app: 2\nTraceback\nKeyError: x\n")
    progress = live.read_progress(run, launcher)
    assert (progress.step, progress.total, progress.seconds_per_step, progress.seconds_left) == (10, 50, 2.0, 80.0)
    assert progress.state == "failed" and progress.error is None and "KeyError" in progress.summary()
    (run / "config.json").write_text(json.dumps({"total_steps": 60}))
    (run / "checkpoint-10").mkdir()
    progress = live.read_progress(run, launcher)
    assert (progress.state, progress.total, progress.resumable) == ("stopped", 60, True)
    (run / TRAIN_LOG).write_text("# flatlora app: 3\nusage: x\ntrain_dreambooth_flat.py: error: argument --rank\n")
    progress = live.read_progress(run, launcher)
    assert progress.state == "refused" and progress.error == "train_dreambooth_flat.py: error: argument --rank"
    (run / DIFFUSERS_FILE).write_bytes(b"")
    assert live.read_progress(run, launcher).state == "finished" and not live.read_progress(run, launcher).resumable


def test_the_timer_redraws_only_when_the_run_changed(tmp_path):
    import gradio as gr

    from app.callbacks import Studio
    from app.train_tab import TrainHandlers

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5, "sigma_t": 0.0, "seconds": 1.0}) + "\n")
    handlers = TrainHandlers(Studio("unused-base", tmp_path, device="cpu"), Launcher(tmp_path))
    first = handlers.tick("run", None, None)
    assert "step 1 / ?" in first[0] and first[-1] == gr.skip()  # drawn; the run picker left alone
    assert all(update == gr.skip() for update in handlers.tick("run", first[-2], None))
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 2, "loss": 0.4, "sigma_t": 0.0, "seconds": 1.0}) + "\n")
    assert "step 2 / ?" in handlers.tick("run", first[-2], None)[0]
    assert all(update == gr.skip() for update in handlers.tick(None, None, None))
    with pytest.raises(gr.Error, match="type an instance prompt"):
        handlers.start_training([], "x", None, None, *[None] * 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
