"""The DreamBooth evaluation (issue 9, part 2): its metrics on ground truth, its statistics, and a reduced run.

Measured accuracy of world_metrics on procedural images: 600/600 random scenes over all nine shapes
(star included) and every colour pair, colour, shape and background all right (100 %); the tests
below re-check it on the evaluation's own prompt sets.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flatlora_diffusion.evaluation import dreambooth as de
from flatlora_diffusion.evaluation import report as eval_report
from flatlora_diffusion.toyworld import toy_world
from flatlora_diffusion.toyworld.world_metrics import Measurement, load_shape_classifier, measure


@pytest.fixture(scope="module")
def classifier():
    return load_shape_classifier()


def _render(combos, seed):
    """Procedural images of (colour, shape, background) combos at random sizes and positions."""
    rng = np.random.default_rng(seed)
    return toy_world.render_many([toy_world.sample_scene(rng, [combo]) for combo in combos])


def test_subject_and_prompts_are_what_the_protocol_says():
    scenes = de.instance_scenes()
    assert len(scenes) == 5 and len({(s.cx, s.cy, s.half_width) for s in scenes}) == 5
    assert {(s.colour, s.shape, s.background) for s in scenes} == {("yellow", "star", "purple")}
    assert "star" in toy_world.SUBJECT_SHAPES and de.INSTANCE_PROMPT == "a yellow sks on a purple background"
    pairs = de.held_out_pairs(43)
    assert len(set(pairs)) == 43 and all(c != "yellow" and b != "purple" and c != b for c, b in pairs)
    assert set(de.prior_combos(24)) <= set(toy_world.train_combos())
    assert de.held_out_pairs(5) == de.held_out_pairs(5)  # deterministic


def test_ground_truth_subject_images_score_perfectly(classifier):
    pairs = de.held_out_pairs(43)  # every held-out pair
    images = _render([(c, de.SUBJECT_SHAPE, b) for c, b in pairs], seed=1)
    scores = de.score_subject(pairs, measure(images, classifier))
    assert scores == {"subject_fidelity": 1.0, "prompt_fidelity": 1.0, "subject_and_prompt": 1.0,
                      "instance_leak": 0.0}
    instance = toy_world.render_many(de.instance_scenes())
    assert de.score_instance(measure(instance, classifier)) == {"instance_fidelity": 1.0}


def test_ground_truth_class_images_score_perfectly(classifier):
    combos = de.prior_combos(60)
    scores = de.score_prior(combos, measure(_render(combos, seed=2), classifier))
    assert scores == {"prior_preservation": 1.0, "prior_subject_leak": 0.0}


def test_metrics_catch_overfitting_and_subject_leakage(classifier):
    pairs = [("red", "green"), ("blue", "white")]
    # the model ignored the prompt and drew the instance images: yellow stars on purple
    images = _render([("yellow", "star", "purple")] * 2, seed=3)
    scores = de.score_subject(pairs, measure(images, classifier))
    assert scores["subject_fidelity"] == 1.0 and scores["prompt_fidelity"] == 0.0 and scores["instance_leak"] == 1.0
    # a class prompt answered with the subject's shape
    combos = [("red", "circle", "green"), ("blue", "square", "white")]
    images = _render([("red", "star", "green"), ("blue", "square", "white")], seed=4)
    assert de.score_prior(combos, measure(images, classifier)) == {"prior_preservation": 0.5,
                                                                   "prior_subject_leak": 0.5}
    assert de.score_instance([Measurement(None, None, "purple")]) == {"instance_fidelity": 0.0}


def _fake_results(deltas):
    """Results with one metric per run: seed s, sigma 0 scores 0.1*s, sigma 0.1 scores 0.1*s + deltas[s]."""
    runs = [{"seed": s, "sigma": sigma, **{k: 0.1 * s + (d if sigma else 0.0) for k, _, _ in eval_report.METRICS},
             "sharpness_0.1": 0.0} for s, d in enumerate(deltas) for sigma in (0.0, 0.1)]
    return {"protocol": {"rhos": [0.1]}, "sigmas": [0.0, 0.1], "runs": runs}


def test_paired_test_by_seed():
    stats = eval_report.summary(_fake_results([0.2, 0.21, 0.19, 0.2, 0.2]))
    assert stats["subject_fidelity"]["0.1"]["p"] < 1e-4 and math.isnan(stats["subject_fidelity"]["0"]["p"])
    assert stats["subject_fidelity"]["0.1"]["mean"] == pytest.approx(0.4)
    assert stats["sharpness_0.1"]["0.1"]["p"] == 1.0  # identical runs: no evidence
    assert math.isnan(eval_report.summary(_fake_results([0.2]))["loss"]["0.1"]["p"])  # one seed: no test


def test_reduced_evaluation_writes_the_report(default_model_dir, tmp_path):
    out = tmp_path / "docs"
    code = de.main(["--quick", "--seeds", "1", "--sigmas", "0", "0.1", "--steps", "2", "--out", str(out),
                    "--work", str(tmp_path / "work"), "--model", str(default_model_dir)])
    assert code == 0
    for name in ("EVALUATION.md", "eval_results.json", "eval_metrics.png", "eval_sharpness.png", "eval_samples.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*tmp"))  # atomic writes left nothing behind
    text = (out / "EVALUATION.md").read_text()
    assert "| metric | better | base model | LoRA (σ=0) | Flat-LoRA σ=0.1 |" in text
    assert "subject fidelity" in text and "sharpness, rho = 0.1" in text and "Quick (CI) run" in text
    results = json.loads((out / "eval_results.json").read_text())
    assert [(r["seed"], r["sigma"]) for r in results["runs"]] == [(0, 0.0), (0, 0.1)]
    before = text
    eval_report.write_markdown(results, out)  # the report can be rebuilt from the raw JSON alone
    assert (out / "EVALUATION.md").read_text().split("## Results")[1] == before.split("## Results")[1]
    run = results["runs"][0]
    assert 0.0 <= run["subject_fidelity"] <= 1.0 and run["loss"] > 0 and "sharpness_0.1" in run


def test_sharpness_is_zero_at_radius_zero_and_positive_when_large(default_model_dir, tmp_path):
    protocol = de.Protocol.quick(steps=1)
    lora = de.train_run(default_model_dir, de.write_instance_images(tmp_path / "inst"), tmp_path / "run", 0.0, 0,
                        protocol)
    pipe = de.load_pipe(default_model_dir, lora)
    result = de.sharpness(pipe, rhos=(0.0, 1.0), draws=2)
    assert result["sharpness_0"] == 0.0  # sigma 0 draws no noise at all
    assert result["sharpness_1"] > 0.0  # a 100 % perturbation of every row must hurt
