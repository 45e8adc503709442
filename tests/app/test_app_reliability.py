"""Issue 14 in the app: hostile LoRA files are refused with a message, the app stays up, nothing outside
the allowed folders is read, and a generation far past its expected time is cancelled."""

from __future__ import annotations

import re
import shutil

import gradio as gr
import pytest

from app import callbacks
from app.callbacks import Settings, Studio
from app.deadline import GenerationClock
from app.runs import AppError
from app.ui import Handlers
from flatlora_diffusion.inference import GenerationTimeout, generate
from flatlora_diffusion.lora.formats import DIFFUSERS_FILE
from tests.app.test_app import make_runs_folder
from tests.lora.hostile_files import PICKLE_MARKER, make_hostile_files

FAST = Settings(steps=2, width=64, height=64)
PROMPT = "a photo of sks cat"


@pytest.fixture(scope="module")
def hostile_runs(default_model_dir, tmp_path_factory):
    """A runs folder: one real run and every hostile file as a loose file; plus one file outside it."""
    shared = make_runs_folder(default_model_dir, tmp_path_factory.getbasetemp())
    root = tmp_path_factory.mktemp("hostile-runs")
    shutil.copytree(shared / "run-a", root / "run-a")
    files = make_hostile_files(root / "run-a" / DIFFUSERS_FILE, root)
    outside = tmp_path_factory.mktemp("elsewhere") / "outside.safetensors"
    shutil.copy(root / "run-a" / DIFFUSERS_FILE, outside)
    return root, files, outside


@pytest.fixture(scope="module")
def studio(default_model_dir, hostile_runs):
    return Studio(default_model_dir, hostile_runs[0], device="cpu")


def test_every_hostile_file_is_a_message_and_the_app_stays_up(studio, hostile_runs):
    root, files, _ = hostile_runs
    handlers = Handlers(studio)
    for kind, (path, message) in files.items():
        label = f"file: {path.name}"
        assert label in studio.sources(), kind
        with pytest.raises(gr.Error, match=re.escape(message)):  # what the UI shows
            handlers.generate(label, PROMPT, "", 0, 2, 5.0, 64, 64, 1.0, "")
        with pytest.raises(gr.Error, match=re.escape(message)):
            handlers.sweep(label, PROMPT, "", 0, 2, 5.0, 64, 64, "0, 1")
    assert not (root / PICKLE_MARKER).exists()  # nothing was unpickled
    base, lora, _ = callbacks.generate_images(studio, "run-a", PROMPT, 0, 1.0, FAST)  # still works afterwards
    assert base.size == lora.size == (64, 64) and studio.base_loads == 1


def test_nan_weights_are_named_in_the_app(studio, hostile_runs):
    _, files, _ = hostile_runs
    path, _ = files["NaN weights"]
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: non-finite .* first in unet down_blocks"):
        callbacks.generate_images(studio, "run-a", PROMPT, 0, 1.0, FAST, compare=f"file: {path.name}")


@pytest.mark.parametrize("label", ["outside", "/etc/passwd", "file: ../elsewhere/outside.safetensors", "file: /etc"])
def test_a_path_outside_the_allowed_folders_is_never_read(studio, hostile_runs, label):
    _, _, outside = hostile_runs
    label = f"file: {outside}" if label == "outside" else label
    with pytest.raises(AppError, match="not in the runs folder"):
        callbacks.generate_images(studio, label, PROMPT, 0, 1.0, FAST)
    assert str(outside.parent) not in " ".join(studio.allowed_paths())


def test_clock_allows_a_generous_multiple_of_the_measured_base_time():
    clock = GenerationClock(factor=20.0, floor_s=30.0, unmeasured_s=600.0)
    assert clock.limit_s(FAST) == 600.0  # nothing measured yet
    clock.seconds_per_work = 2.0 / (25 * 1024 * 1024)  # a base SDXL image: 2 s for 25 steps at 1024 px
    assert clock.limit_s(Settings(steps=25)) == pytest.approx(40.0)
    assert clock.limit_s(Settings(steps=50, width=2048, height=2048)) == pytest.approx(320.0)
    assert clock.limit_s(FAST) == 30.0  # the floor


def test_generate_past_its_limit_is_cancelled_and_the_pipeline_recovers(studio):
    steps = []
    with studio.pipeline() as pipe:
        original = pipe.unet.forward
        pipe.unet.forward = lambda *a, **kw: steps.append(1) or original(*a, **kw)
        try:
            with pytest.raises(GenerationTimeout, match="cancelled after"):
                generate(pipe, PROMPT, 0, steps=20, guidance=1.0, width=64, height=64, time_limit_s=0.0)
            assert len(steps) == 1  # stopped after the first denoising step, not after all 20
            assert generate(pipe, PROMPT, 0, steps=2, guidance=1.0, width=64, height=64).size == (64, 64)
        finally:
            del pipe.unet.forward


def test_a_lora_generation_far_past_the_base_time_is_a_message(studio):
    slow = Studio(studio.base, studio.runs_dir, device="cpu")
    slow._pipe, slow.base_loads = studio._pipe, 1  # share the loaded base: these tests load it once
    slow.clock = GenerationClock(factor=0.0, floor_s=0.0)  # every LoRA image is "far past" the base time
    with pytest.raises(gr.Error, match="generation cancelled after .* far past its expected time"):
        Handlers(slow).generate("run-a", PROMPT, "", 0, 2, 5.0, 64, 64, 1.0, "")
    assert slow.clock.seconds_per_work is not None  # the base image was measured first
    base, _, _ = callbacks.generate_images(studio, "run-a", PROMPT, 0, 1.0, FAST)  # the app is free again
    assert base.size == (64, 64)
