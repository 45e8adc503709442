"""Issue 6: the Gradio preview app (callbacks, run browser, CLI, an in-process launch via gradio_client)."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from app import __main__ as app_main
from app import callbacks
from app.callbacks import Settings, Studio
from app.runs import AppError, check_lora_path, discover_sources, list_samples, lookup, read_config, read_metrics
from app.ui import Handlers, build_ui
from flatlora_diffusion.lora.formats import DIFFUSERS_FILE, KOHYA_FILE

FAST = Settings(steps=2, width=64, height=64)
PROMPT = "a photo of sks cat"


def make_runs_folder(model_dir: Path, basetemp: Path) -> Path:
    """A runs folder shared by the app tests (built once per session).

    run-a: a real 2-step training run; loose.safetensors: a copy of its kohya file;
    broken/: a corrupt LoRA, a half-written metrics line and invalid config.json.
    """
    from skimage import data

    from flatlora_diffusion.training.cli import run_training

    root = basetemp / "app-runs"
    if (root / "run-a" / DIFFUSERS_FILE).is_file():
        return root
    photos = basetemp / "app-instance"
    photos.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data.chelsea()).resize((96, 72)).save(photos / "chelsea.png")
    code = run_training([
        "--pretrained_model_name_or_path", str(model_dir), "--instance_data_dir", str(photos),
        "--instance_prompt", PROMPT, "--resolution", "64", "--output_dir", str(root / "run-a"),
        "--max_train_steps", "2", "--learning_rate", "1e-2", "--rank", "4", "--lora_alpha", "6",
        "--validation_prompt", "a sks cat", "--validation_inference_steps", "2", "--num_validation_images", "1"])
    assert code == 0
    shutil.copy(root / "run-a" / KOHYA_FILE, root / "loose.safetensors")
    broken = root / "broken"
    broken.mkdir()
    (broken / DIFFUSERS_FILE).write_bytes(b"not a safetensors file")
    (broken / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5, "sigma_t": 0.0}\n{"step": 2, "lo')
    (broken / "config.json").write_text("{oops")
    os.utime(broken / DIFFUSERS_FILE, (1e9, 1e9))  # older than run-a, so run-a is the default choice
    (root / "empty-folder").mkdir()
    (root / "notes.txt").write_text("not a LoRA")
    return root


@pytest.fixture(scope="module")
def runs(default_model_dir, tmp_path_factory):
    return make_runs_folder(default_model_dir, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def studio(default_model_dir, runs):
    return Studio(default_model_dir, runs, device="cpu")


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# ---------------------------------------------------------------- runs folder


def test_sources_are_the_runs_and_loose_files_only(runs, tmp_path):
    extra = tmp_path / "mine.safetensors"
    shutil.copy(runs / "loose.safetensors", extra)
    sources = discover_sources(runs, (extra,))
    assert list(sources) == ["run-a", "broken", "file: loose.safetensors", f"file: {extra}"]
    assert sources["run-a"].file.name == DIFFUSERS_FILE and sources["run-a"].folder == runs / "run-a"
    assert [p.name for p in sources["run-a"].downloads()] == [DIFFUSERS_FILE, KOHYA_FILE]
    assert sources["file: loose.safetensors"].folder is None


def test_a_symlink_out_of_the_runs_folder_is_not_offered(runs, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(runs / "loose.safetensors", outside)
    root = tmp_path / "runs"
    root.mkdir()
    (root / "sneaky.safetensors").symlink_to(outside)
    assert discover_sources(root) == {}


def test_unknown_or_missing_choices_raise_a_user_error(runs):
    sources = discover_sources(runs)
    with pytest.raises(AppError, match="choose a run"):
        lookup(sources, "")
    with pytest.raises(AppError, match="not in the runs folder"):
        lookup(sources, "/etc/passwd")


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.bin"])
def test_only_safetensors_files_are_accepted(tmp_path, name):
    (tmp_path / name).write_bytes(b"pickle")
    with pytest.raises(AppError, match="only .safetensors"):
        check_lora_path(tmp_path / name)
    with pytest.raises(AppError, match="no such file"):
        check_lora_path(tmp_path / "missing.safetensors")


def test_metrics_config_and_samples_are_read_defensively(runs, tmp_path):
    rows, skipped = read_metrics(runs / "broken")
    assert [r["step"] for r in rows] == [1] and skipped == 1
    assert "not valid JSON" in read_config(runs / "broken")["error"]
    assert read_metrics(tmp_path) == ([], 0) and "no config.json" in read_config(tmp_path)["error"]
    samples = tmp_path / "samples"
    samples.mkdir()
    for name in ("final_0_a_cat.png", "step000100_0_a_cat.png", "step000020_1_a_cat.png", "other.png"):
        (samples / name).write_bytes(b"")
    assert [c for _, c in list_samples(tmp_path)] == ["step 20: a cat", "step 100: a cat", "final: a cat"]


# ---------------------------------------------------------------- callbacks


def test_browse_shows_a_real_run(studio):
    view = callbacks.browse(studio, "run-a")
    assert [caption for _, caption in view.samples] == ["final: a sks cat"]
    assert view.figure is not None and len(view.figure.axes) == 2
    assert view.config["rank"] == 4 and view.metadata["ss_network_dim"] == "4"
    assert isinstance(view.metadata["lora_adapter_metadata"], dict)  # JSON value expanded
    assert [p.name for p in view.downloads] == [DIFFUSERS_FILE, KOHYA_FILE]


def test_browse_reports_a_broken_run_instead_of_failing(studio):
    view = callbacks.browse(studio, "broken")
    assert "cannot read the LoRA file" in view.message and "skipped 1" in view.message
    assert view.metadata == {} and "error" in view.config
    assert "not in the runs folder" in callbacks.browse(studio, "nope").message


def test_lora_changes_the_image_and_scale_zero_is_the_base(studio):
    base, lora, third = callbacks.generate_images(studio, "run-a", PROMPT, 3, 1.0, FAST)
    assert third is None and base.size == lora.size == (64, 64)
    assert np.abs(pixels(base) - pixels(lora)).max() > 0
    base0, lora0, _ = callbacks.generate_images(studio, "run-a", PROMPT, 3, 0.0, FAST)
    assert np.array_equal(pixels(base0), pixels(lora0))
    assert np.array_equal(pixels(base0), pixels(base))  # the LoRA never leaks into the base image


def test_base_loads_once_across_runs_scales_and_comparisons(studio):
    seen = []
    for run, compare, scale in [("run-a", "file: loose.safetensors", 1.0), ("file: loose.safetensors", "run-a", 0.5)]:
        _, lora, third = callbacks.generate_images(studio, run, PROMPT, 1, scale, FAST, compare=compare,
                                                   progress=lambda f, desc="": seen.append(f))
        # the kohya copy is the same LoRA as the diffusers file: same image at the same scale
        assert np.array_equal(pixels(lora), pixels(third))
    assert studio.base_loads == 1
    assert seen[:3] == [0.0, 2 / 3, 1.0]  # progress: base and LoRA, then the second LoRA, then done


def test_scale_sweep_matches_single_generations(studio):
    images = callbacks.scale_sweep(studio, "run-a", PROMPT, 3, "0, 1", FAST)
    assert [caption for _, caption in images] == ["scale 0", "scale 1"]
    base, lora, _ = callbacks.generate_images(studio, "run-a", PROMPT, 3, 1.0, FAST)
    assert np.array_equal(pixels(images[0][0]), pixels(base))
    assert np.array_equal(pixels(images[1][0]), pixels(lora))


def test_a_bad_lora_file_is_a_user_error(studio):
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        callbacks.generate_images(studio, "broken", PROMPT, 0, 1.0, FAST)
    with pytest.raises(gr.Error, match="not a readable safetensors file"):  # the UI shows it
        Handlers(studio).generate("broken", PROMPT, "", 0, 2, 5.0, 64, 64, 1.0, "")
    base, _, _ = callbacks.generate_images(studio, "run-a", PROMPT, 0, 1.0, FAST)  # still works afterwards
    assert base.size == (64, 64)


@pytest.mark.parametrize("field, kwargs", [("width", dict(width=100)), ("height", dict(height=32)),
                                           ("steps", dict(steps=0)), ("guidance", dict(guidance=-1.0))])
def test_settings_name_the_bad_field(field, kwargs):
    with pytest.raises(AppError, match=field):
        Settings(**kwargs)


def test_seed_scales_and_prompt_are_checked():
    assert callbacks.check_seed(7.0) == 7
    for bad in (-1, 1.5, None, "x", 2**40):
        with pytest.raises(AppError, match="seed"):
            callbacks.check_seed(bad)
    assert callbacks.parse_scales("0, 0.5,1 1.5") == [0.0, 0.5, 1.0, 1.5]
    for bad in ("a, b", "", ",".join(["1"] * 9)):
        with pytest.raises(AppError):
            callbacks.parse_scales(bad)
    with pytest.raises(AppError, match="prompt"):
        callbacks.check_prompt("  ")


def test_random_seed_is_in_range_and_reproducible_with_an_rng():
    assert callbacks.random_seed(random.Random(1)) == callbacks.random_seed(random.Random(1))
    assert all(0 <= callbacks.random_seed() <= callbacks.MAX_SEED for _ in range(20))


def test_refresh_keeps_the_choice_and_finds_new_runs(studio, runs):
    shutil.copy(runs / "loose.safetensors", runs / "new.safetensors")
    try:
        run, compare = Handlers(studio).refresh("run-a", "gone")
    finally:
        (runs / "new.safetensors").unlink()
    labels = [choice[0] if isinstance(choice, tuple) else choice for choice in run.choices]
    assert run.value == "run-a" and compare.value == "" and "file: new.safetensors" in labels


# ---------------------------------------------------------------- command line


@contextlib.contextmanager
def listening_socket():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def free_port() -> int:
    with listening_socket() as port:
        return port


def test_a_port_in_use_is_one_error_line_and_exit_2(capsys):
    with listening_socket() as port:
        assert app_main.main(["--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: port") and "in use" in err


def test_pickle_files_on_the_command_line_are_refused(tmp_path, capsys):
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    assert app_main.main(["--lora", str(tmp_path / "model.ckpt"), "--port", str(free_port())]) == 2
    assert "only .safetensors" in capsys.readouterr().err


def test_a_missing_base_folder_is_named(capsys):
    assert app_main.main(["--base", "./no-such-model", "--port", str(free_port())]) == 2
    assert capsys.readouterr().err == "error: --base ./no-such-model: no such folder\n"


def test_defaults_bind_localhost_and_the_outputs_folder():
    args = app_main.parse_args([])
    assert (args.host, args.port, args.base, args.lora) == ("127.0.0.1", 7860, None, [])
    assert app_main.resolve_inputs(args) == (app_main.DEFAULT_RUNS, ())


# ---------------------------------------------------------------- in-process launch

@contextlib.contextmanager
def launched(studio: Studio):
    """The app served in this process on a free localhost port; yields its URL."""
    demo = build_ui(studio)
    app_main.serve(demo, studio, "127.0.0.1", free_port(), block=False)
    try:
        yield demo.local_url
    finally:
        demo.close()


def test_generate_endpoint_answers_gradio_client(studio):
    from gradio_client import Client

    with launched(studio) as url:
        client = Client(url, verbose=False)
        params = {p["parameter_name"] for p in client.view_api(print_info=False, return_format="dict")
                  ["named_endpoints"]["/generate"]["parameters"]}
        assert {"prompt", "seed", "lora_scale"} <= params
        base, lora, third, status = client.predict(run="run-a", prompt=PROMPT, seed=5, lora_scale=1.0, steps=2,
                                                   width=64, height=64, api_name="/generate")
    assert third is None and "seed 5" in status
    assert np.abs(pixels(Image.open(base)) - pixels(Image.open(lora))).max() > 0
    assert studio.base_loads == 1
