"""Issue 17: the launcher on real processes (the trainer, a stand-in of it) and through the API.

The real runs use the embedded model at 64 px for a few dozen steps of well under a second each:
start, stop (exit 130 and a checkpoint), resume, finish; a refused config; gradio_client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import live
from app.launcher import TRAIN_LOG, TRAIN_PID, Launcher, is_trainer, read_pid_file, start_ticks
from app.runs import AppError
from app.train_form import create_run
from flatlora_diffusion.lora.formats import DIFFUSERS_FILE
from tests.app.train_helpers import PROMPT, WAIT, png, quick_form, wait_for


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
