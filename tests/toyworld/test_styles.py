"""The hollow style and its detector: ground-truth styled images score ~1, plain ones 0, content intact."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from flatlora_diffusion.toyworld import styles, toy_world
from flatlora_diffusion.toyworld.world_metrics import load_shape_classifier, measure


@pytest.fixture(scope="module")
def classifier():
    return load_shape_classifier()


def _scenes(seed: int, shapes=styles.STYLE_SHAPES):
    combos = [(c, s, b) for c, s, b in itertools.product(toy_world.COLOURS, shapes, toy_world.COLOURS) if c != b]
    rng = np.random.default_rng(seed)
    return combos, [toy_world.sample_scene(rng, [combo]) for combo in combos]


def test_styled_images_score_one_and_keep_their_content(classifier):
    combos, scenes = _scenes(seed=0)  # every colour pair on every style shape (168 images)
    content, scores = styles.measure_styled(styles.render_styled_many(scenes), classifier)
    # pixel masks include anti-aliased edges, so small holes measure a little smaller than drawn
    assert min(scores) > 2 * styles.STYLED_THRESHOLD and np.median(scores) > 0.85
    assert [(m.colour, m.shape, m.background) for m in content] == combos


def test_plain_images_score_zero_and_measure_as_before(classifier):
    shapes = tuple(s for s in toy_world.ALL_SHAPES if s != "ring")  # a plain ring *is* a hollow circle
    combos, scenes = _scenes(seed=1, shapes=shapes)
    combos, scenes = combos[::3], scenes[::3]
    images = toy_world.render_many(scenes)
    content, scores = styles.measure_styled(images, classifier)
    assert max(scores) == 0.0
    assert [(m.colour, m.shape, m.background) for m in content] == combos
    assert content == measure(images, classifier)  # destyling a plain image changes nothing


def test_the_hole_is_where_the_style_says():
    scene = toy_world.Scene("square", "red", "white", 32.0, 32.0, 10.0)
    image = styles.render_styled(scene)
    assert tuple(image[32, 32]) == toy_world.PALETTE["white"]  # the middle shows the background
    assert tuple(image[32, 32 + 8]) == toy_world.PALETTE["red"]  # the band, 0.45 half-widths wide
    assert tuple(image[32, 32 + 12]) == toy_world.PALETTE["white"]  # outside
    assert styles.hollow_fraction(image) == pytest.approx(styles.HOLE_FRACTION["square"], abs=0.06)
    assert (styles.destyle(image) == toy_world.render(scene)).all(axis=-1).mean() > 0.98  # all but the inner edge


def test_a_half_filled_hole_scores_in_between_and_an_open_one_zero():
    scene = toy_world.Scene("circle", "green", "yellow", 32.0, 32.0, 16.0)
    image = styles.render_styled(scene)
    image[:32] = toy_world.render(scene)[:32]  # top half drawn plain: half the hole is left
    assert 0.3 < styles.style_score(image, "circle") < 0.7
    image = styles.render_styled(scene)
    image[30:34, 32:] = toy_world.PALETTE["yellow"]  # a gap cut through the band: nothing is enclosed
    assert styles.style_score(image, "circle") == 0.0


def test_only_style_shapes_are_styled():
    with pytest.raises(ValueError, match="hollow style"):
        styles.render_styled(toy_world.Scene("cross", "red", "white", 32.0, 32.0, 10.0))
