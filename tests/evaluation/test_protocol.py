"""The curve protocol: a resumed curve gives exactly the LoRA of a run of each length; the CLI runs end to end."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from flatlora_diffusion.evaluation import dreambooth, pilot, protocol, tasks
from flatlora_diffusion.evaluation.sharpness import sharpness

RECIPE = protocol.Recipe(lengths=(2, 4), rank=2, alpha=3.0, learning_rate=3e-3, text_encoder_lr=1e-3)


def _args(model, data, out, steps, recipe=RECIPE):
    return protocol.training_args(model, data, out, recipe, 0.1, 0, steps, tasks.StyleTask().prompt(
        ("red", "circle", "white")))


def test_each_length_of_a_curve_is_the_run_of_that_length(default_model_dir, tmp_path):
    data = tasks.write_training_folder(tasks.StyleTask(), tmp_path / "data")
    first = protocol.train_stage(_args(default_model_dir, data, tmp_path / "curve", 2), tmp_path / "curve", 2)
    second = protocol.train_stage(_args(default_model_dir, data, tmp_path / "curve", 4), tmp_path / "curve", 4)
    alone = protocol.train_stage(_args(default_model_dir, data, tmp_path / "alone", 4, protocol.Recipe(
        lengths=(4,), rank=2, alpha=3.0, learning_rate=3e-3, text_encoder_lr=1e-3)), tmp_path / "alone", 4)
    a, b, c = load_file(first), load_file(second), load_file(alone)
    assert a.keys() == c.keys() and any("text_encoder" in k for k in a)
    assert all(torch.equal(b[k], c[k]) for k in c)  # resumed to 4 == trained to 4
    assert not all(torch.equal(a[k], c[k]) for k in c)  # and the stages differ


def test_cosine_curves_train_each_length_from_scratch(default_model_dir, tmp_path, monkeypatch):
    cosine = protocol.Recipe(lengths=(2, 4), rank=2, alpha=3.0, learning_rate=3e-3, text_encoder_lr=1e-3,
                             flat_schedule="cosine")
    data = tasks.write_training_folder(tasks.StyleTask(), tmp_path / "data")
    seen = []

    def fake_stage(args, out, steps):  # record what each stage was asked, and what it found in its folder
        seen.append((steps, args, sorted(p.name for p in out.glob("*")) if out.exists() else []))
        out.mkdir(parents=True, exist_ok=True)
        (out / f"stage{steps}.marker").touch()
        return out / f"stage{steps}.marker"

    monkeypatch.setattr(protocol, "train_stage", fake_stage)
    monkeypatch.setattr(protocol, "evaluate", lambda *a, **k: ({"fidelity_out": 0.0}, {}))
    for sigma, resumed in ((0.1, False), (0.0, True)):  # sigma 0 is plain LoRA whatever the schedule
        seen.clear()
        protocol.run_curve(default_model_dir, data, tmp_path / "work", tasks.StyleTask(), cosine, protocol.QUICK_SIZES,
                           sigma, 0, classifier=None)
        (_, first, _), (_, second, found) = seen
        assert first[first.index("--flat_schedule") + 1] == "cosine"
        assert ("--resume_from_checkpoint" in second) == resumed
        assert ("stage2.marker" in found) == resumed  # a run of its own length starts in an empty folder
        assert second[second.index("--checkpointing_steps") + 1] == ("2" if resumed else "4")
    assert "cosine Flat-LoRA sigma ramp" in cosine.describe()
    with pytest.raises(ValueError, match="flat_schedule"):
        protocol.Recipe(flat_schedule="linear")


def test_the_cosine_schedule_reaches_the_trainer(default_model_dir, tmp_path):
    data = tasks.write_training_folder(tasks.StyleTask(), tmp_path / "data")
    files = {}
    for schedule in ("constant", "cosine"):
        recipe = protocol.Recipe(lengths=(3,), rank=2, alpha=3.0, learning_rate=3e-3, text_encoder_lr=1e-3,
                                 flat_schedule=schedule)
        files[schedule] = load_file(protocol.train_stage(_args(default_model_dir, data, tmp_path / schedule, 3, recipe),
                                                         tmp_path / schedule, 3))
    assert not all(torch.equal(files["constant"][k], files["cosine"][k]) for k in files["cosine"])


def test_recipe_and_sizes_refuse_nonsense():
    with pytest.raises(ValueError, match="lengths"):
        protocol.Recipe(lengths=(200, 100))
    with pytest.raises(ValueError, match="rank"):
        protocol.Recipe(rank=0)
    with pytest.raises(ValueError, match="prompts_out"):
        protocol.Sizes(prompts_out=0)
    assert "rank 8" in protocol.RECIPES["style"].describe()


def test_quick_protocol_end_to_end(default_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code = dreambooth.main(["--quick", "--seeds", "1", "--sigmas", "0", "0.1", "--out", str(out),
                            "--work", str(tmp_path / "work"), "--model", str(default_model_dir)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "recipe: LoRA rank 2 alpha 1" in printed and "lengths 2, 4 steps" in printed
    for name in ("REPORT.md", "results.json", "curves.png", "tradeoff.png", "samples.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert [(r["sigma"], r["steps"]) for r in results["rows"]] == [(0.0, 2), (0.0, 4), (0.1, 2), (0.1, 4)]
    assert all(0.0 <= r[k] <= 1.0 for r in results["rows"] for k in tasks.METRICS)
    assert re.fullmatch(r"[0-9a-f]{40}(\+changes)?|unknown", results["run"]["commit"])  # which code made them
    assert {c["metric"] for c in results["comparisons"]} >= {"fidelity_out", "adherence", "sharpness_0.1"}
    text = (out / "REPORT.md").read_text()
    assert "Quick (CI) run" in text and "Holm" in text
    (out / "REPORT.md").unlink()
    assert dreambooth.main(["--report-only", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    assert (out / "REPORT.md").read_text().split("## Paired")[1] == text.split("## Paired")[1]
    common = ["--quick", "--seeds", "1", "--sigmas", "0", "0.1", "--out", str(out), "--work", str(tmp_path / "work"),
              "--model", str(default_model_dir)]
    assert dreambooth.main(common + ["--extend", "--lengths", "2", "4", "6"]) == 0  # resumes each curve to 6 steps
    extended = json.loads((out / "results.json").read_text())
    assert [(r["sigma"], r["steps"]) for r in extended["rows"]] == [(s, n) for s in (0.0, 0.1) for n in (2, 4, 6)]
    assert extended["rows"][0] == results["rows"][0] and extended["lengths"] == [2, 4, 6]
    with pytest.raises(SystemExit) as stop:
        dreambooth.main(common + ["--extend", "--lengths", "2", "4", "6"])  # nothing left to add
    assert stop.value.code == 2
    with pytest.raises(SystemExit) as stop:  # a constant-sigma sweep is not extended with cosine runs
        dreambooth.main(common + ["--extend", "--lengths", "2", "4", "6", "8", "--flat_schedule", "cosine"])
    assert stop.value.code == 2 and "--flat_schedule constant" in capsys.readouterr().err


def test_cli_refuses_a_missing_model_and_no_reference(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        dreambooth.main(["--quick", "--model", str(tmp_path / "nothing")])
    assert stop.value.code == 2 and "not a diffusers folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        dreambooth.main(["--quick", "--sigmas", "0.1"])
    assert stop.value.code == 2 and "must include 0" in capsys.readouterr().err


def test_sharpness_is_zero_at_radius_zero_and_positive_when_large(default_model_dir, tmp_path):
    task = tasks.StyleTask()
    data = tasks.write_training_folder(task, tmp_path / "data")
    lora = protocol.train_stage(_args(default_model_dir, data, tmp_path / "run", 2), tmp_path / "run", 2)
    result = sharpness(protocol.load_pipe(default_model_dir, lora), task, rhos=(0.0, 1.0), draws=2)
    assert result["sharpness_0"] == 0.0  # sigma 0 draws no noise at all
    assert result["sharpness_1"] > 0.0 and result["loss"] > 0.0


def test_pilot_table_marks_the_target():
    rows = [{"recipe": "a", "steps": 50, "fidelity_in": 0.95, "fidelity_out": 0.6, "adherence": 1.0, "joint_out": 0.5,
             "leak": 0.0, "prior": 0.9, "prior_leak": 0.0},
            {"recipe": "a", "steps": 100, "fidelity_in": 0.95, "fidelity_out": 0.3, "adherence": 1.0, "joint_out": 0.3,
             "leak": 0.0, "prior": 0.9, "prior_leak": 0.0}]
    lines = pilot.pilot_table(rows).splitlines()
    assert lines[2].startswith("| a | 50 | 1 | 0.95 | 0.60") and lines[2].endswith("| ✓ |")
    assert lines[3].endswith("|  |")


def test_a_failed_curve_in_a_pool_is_reported_not_fatal(tmp_path):
    job = (tmp_path / "no-model", tmp_path / "no-data", tmp_path / "work", "style", protocol.QUICK_RECIPE,
           protocol.QUICK_SIZES, 0.0, 0, ())
    [(returned, rows, samples, error)] = list(dreambooth.curves([job], processes=2, threads=1))
    assert returned == job and rows == [] and samples == {} and error


def test_pilot_refuses_lengths_that_do_not_increase(capsys):
    with pytest.raises(SystemExit) as stop:
        pilot.main(["--lengths", "200", "100"])
    assert stop.value.code == 2 and "lengths must be increasing" in capsys.readouterr().err


def test_the_recorded_commit_marks_code_changes_not_result_files(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)
    (tmp_path / "flatlora_diffusion").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "flatlora_diffusion" / "code.py").write_text("x = 1\n")
    (tmp_path / "docs" / "REPORT.md").write_text("old\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "start")
    here = tmp_path / "flatlora_diffusion"
    clean = protocol.code_commit(here)
    assert re.fullmatch(r"[0-9a-f]{40}", clean)
    (tmp_path / "docs" / "REPORT.md").write_text("a sweep's new results\n")
    assert protocol.code_commit(here) == clean
    (tmp_path / "flatlora_diffusion" / "code.py").write_text("x = 2\n")
    assert protocol.code_commit(here) == clean + "+changes"
