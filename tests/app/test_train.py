"""Issue 17: the app trains too (TOML writer, safe uploads, the form, live progress, the launcher).

The launcher tests start the real train_dreambooth_flat.py on the embedded model (64 px, a few
dozen steps of well under a second each), stop it, resume it and let it finish.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import live, toml_writer
from app.launcher import (
    RUN_TOML,
    TRAIN_LOG,
    TRAIN_PID,
    Launcher,
    command_line,
    is_trainer,
    read_pid_file,
    start_ticks,
)
from app.runs import AppError, LoraSource, suggested_prompt
from app.train_form import TrainForm, create_run
from app.uploads import chosen_folder, image_folders, safe_name, store_uploads
from flatlora_diffusion.lora.formats import DIFFUSERS_FILE
from flatlora_diffusion.training.config import parse_config

PROMPT = "a sks cat"
WAIT = 300  # seconds a run may take on a loaded 2-core machine (it takes about 15)


def png(path: Path, colour=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (72, 64), colour).save(path)
    return path


def quick_form(**overrides) -> TrainForm:
    """A short run at the embedded model's size; `overrides` replace fields."""
    values = dict(instance_prompt=PROMPT, image_folder="photos", max_train_steps=40.0, resolution=64.0, rank=4.0,
                  lora_alpha=6.0, learning_rate=1e-3, checkpointing_steps=1000.0, num_validation_images=1.0,
                  validation_inference_steps=2.0, validation_prompt="a sks cat on a sofa")
    return TrainForm(**{**values, **overrides})


@pytest.fixture(autouse=True)
def no_stray_trainers(tmp_path):
    """A failing test must not leave its trainer running: kill those working under its tmp_path."""
    yield
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and is_trainer(int(entry.name)) and \
                any(str(tmp_path) in part for part in command_line(int(entry.name))):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "runs"
    png(root / "photos" / "cat.png")
    return root


def wait_for(condition, timeout: float = WAIT, what: str = "condition", every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


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


def test_a_pid_file_of_a_reused_pid_or_another_program_is_not_a_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / TRAIN_PID).write_text(json.dumps({"pid": os.getpid(), "start_ticks": start_ticks(os.getpid())}))
    assert read_pid_file(run)["pid"] == os.getpid()
    assert Launcher(tmp_path).running_pid(run) is None  # alive, but pytest is not the trainer
    assert not is_trainer(os.getpid())
    (run / TRAIN_PID).write_text("not json")
    assert read_pid_file(run) is None and Launcher(tmp_path).active() is None


def stand_in_trainer(folder: Path) -> Path:
    """A script named like the trainer that waits for SIGTERM and exits 130, as the trainer does."""
    fake = folder / "train_dreambooth_flat.py"
    fake.parent.mkdir(parents=True, exist_ok=True)
    fake.write_text("import signal, sys, time\n"
                    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(130))\n"
                    "print('ready', flush=True)\ntime.sleep(60)\n")
    return fake


def test_closing_the_app_leaves_the_run_training_and_a_new_app_finds_it(root, tmp_path):
    fake = stand_in_trainer(tmp_path / "bin")
    folder = create_run(root, quick_form(run_name="orphan"), None, "base")
    app_process = (f"from app.launcher import Launcher; from pathlib import Path; "
                   f"print(Launcher(Path({str(root)!r}), Path({str(fake)!r})).start(Path({str(folder)!r})))")
    done = subprocess.run([sys.executable, "-c", app_process], cwd=Path(__file__).parents[2], capture_output=True,
                          text=True, timeout=60, check=True)  # the app starts the run and exits
    pid = int(done.stdout)
    restarted = Launcher(root)
    wait_for(lambda: "ready" in (folder / TRAIN_LOG).read_text(), what="the stand-in to start")
    assert restarted.running_pid(folder) == pid and restarted.active() == folder.resolve()
    assert restarted.stop(folder) == pid
    wait_for(lambda: restarted.running_pid(folder) is None, timeout=30, what="the stand-in to stop")


def test_a_command_line_run_is_found_and_stopped(tmp_path):
    """A trainer started in a terminal (not by the app) is found through /proc and stops on SIGTERM."""
    fake = stand_in_trainer(tmp_path / "bin")
    root = tmp_path / "runs"
    (root / "cli-run").mkdir(parents=True)
    process = subprocess.Popen([sys.executable, str(fake), "--output_dir", "runs/cli-run"], cwd=tmp_path,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "ready\n"
        launcher = Launcher(root)
        assert launcher.running_pid(root / "cli-run") == process.pid
        assert launcher.active() == (root / "cli-run").resolve()
        assert launcher.stop(root / "cli-run") == process.pid
        assert process.wait(30) == 130
        assert launcher.running_pid(root / "cli-run") is None
    finally:
        process.kill()
        process.wait()


# ---------------------------------------------------------------- the real trainer


def test_start_stop_resume_finish(root, default_model_dir):
    folder = create_run(root, quick_form(run_name="live"), None, str(default_model_dir))
    app = Launcher(root)
    pid = app.start(folder)
    wait_for(lambda: live.read_progress(folder, app).step >= 1, what="the first step")
    assert os.getsid(pid) == pid  # its own session: closing the app (or Ctrl-C in its terminal) leaves it alone
    restarted = Launcher(root)  # a new app process: finds the run from train.pid
    assert restarted.running_pid(folder) == pid and restarted.active() == folder
    assert live.read_progress(folder, restarted).state == "training"
    with pytest.raises(AppError, match="one run at a time"):
        restarted.start(folder)
    restarted.stop(folder)
    assert app.wait(folder, WAIT) == 130
    stopped = live.read_progress(folder, app)
    checkpoints = sorted(folder.glob("checkpoint-*"))
    assert stopped.state == "stopped" and stopped.resumable and stopped.exit_code == 130
    assert [p.name for p in checkpoints] == [f"checkpoint-{stopped.step}"] and 1 <= stopped.step < 40
    assert not (folder / DIFFUSERS_FILE).exists()
    app.start(folder, resume=True)
    assert app.wait(folder, WAIT) == 0
    done = live.read_progress(folder, app)
    assert (done.state, done.step, done.total, done.pid) == ("finished", 40, 40, None)
    steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))  # each step once across the stop and the resume
    log = (folder / TRAIN_LOG).read_text()
    assert f"resumed from {folder / checkpoints[0].name}" in log and "--resume_from_checkpoint latest" in log
    assert [caption for _, caption in live.newest_samples(folder)] == ["final: a sks cat on a sofa"]


def test_a_refused_config_shows_the_trainers_error_line(root, default_model_dir):
    folder = create_run(root, quick_form(run_name="bad", resolution=100.0), None, str(default_model_dir))
    app = Launcher(root)
    app.start(folder)
    assert app.wait(folder, WAIT) == 2
    progress = live.read_progress(folder, app)
    assert progress.state == "refused" and not progress.resumable
    assert progress.error == "error: --resolution must be a multiple of 8 (the VAE downsamples by 8), got 100"
    assert progress.error in progress.summary()


# ---------------------------------------------------------------- through the API


def test_gradio_client_starts_a_run_and_reads_its_progress(default_model_dir, tmp_path, monkeypatch):
    from gradio.utils import get_upload_folder
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError as ClientError

    from app import __main__ as app_main
    from app.callbacks import Studio
    from tests.app.test_app import launched

    root = tmp_path / "runs"
    root.mkdir()
    settings = dict(instance_prompt=PROMPT, max_train_steps=8, resolution=64, rank=4, lora_alpha=6,
                    learning_rate=1e-3, num_validation_images=1, validation_inference_steps=2)
    monkeypatch.setattr(app_main, "MAX_UPLOAD", "50kb")  # the server's upload limit, made small to test it
    noise = tmp_path / "big" / "noise.png"
    noise.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(noise)
    with launched(Studio(default_model_dir, root, device="cpu")) as url:
        client = Client(url, verbose=False)
        with pytest.raises(Exception, match="(?i)file size|too large|exceeds"):
            client.predict(images=[handle_file(noise)], run_name="big", api_name="/start_training", **settings)
        message, run = client.predict(images=[handle_file(png(tmp_path / "up" / "cat.png"))],
                                      run_name="../../from client", api_name="/start_training", **settings)
        assert run == "from_client" and "started" in message
        refused = f"refused-{time.time_ns()}.png"  # a name no other upload has
        with pytest.raises(ClientError, match="one run at a time"):
            client.predict(images=[handle_file(png(tmp_path / "up" / refused))], run_name="second",
                           api_name="/start_training", **settings)
        assert not list(Path(get_upload_folder()).rglob(refused))  # a refused upload is not kept anywhere
        seen = []

        def finished():
            seen.append(client.predict(run=run, api_name="/training_progress"))
            return seen[-1]["state"] == "finished"

        wait_for(finished, what="the run to finish", every=0.5)
    assert {"starting", "training"} & {p["state"] for p in seen}
    assert [p["step"] for p in seen] == sorted(p["step"] for p in seen)  # progress only moves forward
    last = seen[-1]
    assert (last["step"], last["total"], last["error"]) == (8, 8, None) and last["seconds_per_step"] > 0
    assert [p.name for p in (root / run / "instance_images").iterdir()] == ["cat.png"]
    assert sorted(p.name for p in root.iterdir()) == ["from_client"]  # the refused second run wrote nothing
