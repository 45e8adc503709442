"""The benchmark's tasks: their data and prompt sets are what the docs say, and ground truth scores right."""

from __future__ import annotations

import numpy as np
import pytest

from flatlora_diffusion.evaluation import tasks
from flatlora_diffusion.toyworld import styles, toy_world
from flatlora_diffusion.toyworld.world_metrics import load_shape_classifier, measure


@pytest.fixture(scope="module")
def classifier():
    return load_shape_classifier()


def _draw(prompted, seed, styled):
    rng = np.random.default_rng(seed)
    scenes = [toy_world.sample_scene(rng, [p.combo]) for p in prompted]
    return styles.render_styled_many(scenes) if styled else toy_world.render_many(scenes)


def test_style_task_data_and_prompts():
    task = tasks.StyleTask()
    images, captions = task.training_images()
    assert images.shape == (24, 64, 64, 3) and len(set(captions)) == 8
    assert captions[0] == "a red circle on a white background in sks style"
    assert all(c.endswith(" in sks style") for c in captions)
    train, out = set(task.train_combos()), set(task.out_combos())
    assert {s for _, s, _ in train} == {"circle", "square"} and {s for _, s, _ in out} == set(styles.STYLE_SHAPES)
    assert all(c not in ("red", "yellow") and b not in ("white", "blue") for c, _, b in out)
    sets = task.prompt_sets(12, 24, 12)
    assert {p.combo for p in sets["in"]} == train and len(set(p.combo for p in sets["out"])) == 24
    assert all("sks" not in p.prompt and p.combo[1] != "ring" for p in sets["prior"])  # a ring reads as hollow
    assert sets == task.prompt_sets(12, 24, 12)


def test_style_task_scores_ground_truth(classifier):
    task = tasks.StyleTask()
    sets = task.prompt_sets(12, 24, 12)
    styled = {"in": _draw(sets["in"], 1, True), "out": _draw(sets["out"], 2, True),
              "prior": _draw(sets["prior"], 3, False)}
    scores = task.score(sets, styled, classifier)
    assert {k: scores[k] for k in tasks.METRICS} == {"fidelity_in": 1.0, "fidelity_out": 1.0, "adherence": 1.0,
                                                      "joint_out": 1.0, "leak": 0.0, "prior": 1.0, "prior_leak": 0.0}
    # no style learnt; then a model that draws the training images whatever it is asked; then style everywhere
    plain = {name: _draw(sets[name], 4, False) for name in ("in", "out", "prior")}
    none = task.score(sets, plain, classifier)
    assert none["fidelity_in"] == none["fidelity_out"] == 0.0 and none["adherence"] == 1.0
    copied = dict(styled, out=_draw([tasks.Prompted("", ("red", "square", "white"))] * 24, 5, True))
    assert task.score(sets, copied, classifier)["leak"] == 1.0
    stylable = [p for p in sets["prior"] if p.combo[1] in styles.STYLE_SHAPES]
    everywhere = dict(styled, prior=_draw(stylable, 6, True))
    leaked = task.score(dict(sets, prior=stylable), everywhere, classifier)
    assert len(stylable) >= 4 and leaked["prior_leak"] == 1.0 and leaked["prior"] == 0.0


def test_subject_task_scores_ground_truth(classifier):
    task = tasks.SubjectTask()
    sets = task.prompt_sets(4, 24, 12)
    assert sets["in"][0].prompt == "a yellow sks on a purple background"
    assert all(c != "yellow" and b != "purple" and s == "star" for c, s, b in (p.combo for p in sets["out"]))
    images = {name: _draw(sets[name], 7, False) for name in ("in", "out", "prior")}
    scores = task.score(sets, images, classifier)
    assert scores == {"fidelity_in": 1.0, "fidelity_out": 1.0, "adherence": 1.0, "joint_out": 1.0, "leak": 0.0,
                      "prior": 1.0, "prior_leak": 0.0}
    overfit = dict(images, out=_draw([tasks.Prompted("", ("yellow", "star", "purple"))] * 24, 8, False))
    scores = task.score(sets, overfit, classifier)
    assert scores["fidelity_out"] == 1.0 and scores["adherence"] == 0.0 and scores["leak"] == 1.0


def test_subject_in_contexts_trains_on_three_backgrounds_and_scores_ground_truth(classifier, tmp_path):
    task = tasks.get_task("subject_contexts")
    images, captions = task.training_images()
    assert len(images) == 12 and sorted(set(captions)) == [
        f"a yellow sks on a {b} background" for b in ("blue", "purple", "white")]
    assert [m.shape for m in measure(images, classifier)].count("star") >= 11  # the instance images are stars
    sets = task.prompt_sets(6, 24, 12)
    assert {p.combo[2] for p in sets["in"]} == {"purple", "white", "blue"}
    assert all(c != "yellow" and b not in ("purple", "white", "blue") for c, _, b in (p.combo for p in sets["out"]))
    drawn = {name: _draw(sets[name], 7, False) for name in ("in", "out", "prior")}
    assert task.score(sets, drawn, classifier)["joint_out"] == 1.0
    on_white = dict(drawn, out=_draw([tasks.Prompted("", ("green", "star", "white"))] * 24, 8, False))
    assert task.score(sets, on_white, classifier)["leak"] == 1.0  # a trained background counts as a leak


def test_training_folder_has_captions(tmp_path):
    folder = tasks.write_training_folder(tasks.StyleTask(), tmp_path / "data")
    assert len(list(folder.glob("*.png"))) == 24
    assert (folder / "style_00.txt").read_text() == "a red circle on a white background in sks style"
    with pytest.raises(ValueError, match="unknown task"):
        tasks.get_task("poster")
