"""--torch_compile compiles the UNet in place: same losses as eager, same files, same keys.

The aot_eager backend traces and runs the same graphs as inductor without generating C++ (inductor
takes minutes per graph on a small CPU); that Flat-LoRA's noisy layers do not recompile from step
to step is tested on the compiled UNet itself in tests/flat/."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from flatlora_diffusion.training.cli import run_training
from flatlora_diffusion.training.metrics import read_metrics
from tests.training.test_training_script import args, instance_dir  # noqa: F401  (a fixture)


def test_compiled_unet_trains_like_eager(default_model_dir, instance_dir, tmp_path):  # noqa: F811
    from torch._dynamo.utils import counters

    counters.clear()
    runs = {}
    for name, extra in (("eager", ()), ("compiled", ("--torch_compile", "--torch_compile_backend", "aot_eager"))):
        out = tmp_path / name
        assert run_training(args(default_model_dir, instance_dir, out, "--max_train_steps", "3",
                                 "--flat_sigma", "0.1", "--center_crop", *extra)) == 0
        runs[name] = out
        compiled_graphs = counters["stats"]["unique_graphs"]
        assert compiled_graphs == 0 if name == "eager" else compiled_graphs > 0
    losses = {name: [r["loss"] for r in read_metrics(out / "metrics.jsonl")] for name, out in runs.items()}
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4, abs=1e-6)
    files = {name: load_file(out / "pytorch_lora_weights.safetensors") for name, out in runs.items()}
    assert files["compiled"].keys() == files["eager"].keys()  # no "_orig_mod." in the exported names
    for key, tensor in files["eager"].items():
        assert (files["compiled"][key] - tensor).abs().max() < 1e-4, key


def test_compile_backend_without_compile_is_refused(default_model_dir, instance_dir, tmp_path, capsys):  # noqa: F811
    code = run_training(args(default_model_dir, instance_dir, tmp_path / "run", "--torch_compile_backend", "eager"))
    assert code == 2 and "--torch_compile_backend is set but --torch_compile is not" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
