"""Aspect-ratio buckets (issue 5)."""

from __future__ import annotations

from flatlora_diffusion.data.buckets import epoch_batches, make_buckets, nearest_bucket


def test_sdxl_buckets_at_1024_include_the_official_ones():
    buckets = make_buckets(1024)
    for official in [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344)]:
        assert official in buckets
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 1024 * 1024 for h, w in buckets)
    assert all(h * w >= 0.85 * 1024 * 1024 for h, w in buckets)


def test_nearest_bucket_follows_the_aspect_ratio():
    buckets = make_buckets(1024)
    assert nearest_bucket(3000, 3000, buckets) == (1024, 1024)
    h, w = nearest_bucket(2000, 3000, buckets)  # landscape 3:2
    assert w > h and abs(w / h - 1.5) < 0.12
    h, w = nearest_bucket(3000, 2000, buckets)
    assert h > w


def test_epoch_batches_stay_in_one_bucket_cover_every_image_and_change_per_epoch():
    bucket_of = [(64, 64)] * 5 + [(64, 128)] * 3 + [(128, 64)] * 2
    a = epoch_batches(bucket_of, 2, seed=0, epoch=0)
    assert all(len({bucket_of[i] for i in batch}) == 1 for batch in a)
    assert sorted(i for batch in a for i in batch) == list(range(10))
    assert a == epoch_batches(bucket_of, 2, seed=0, epoch=0)
    assert a != epoch_batches(bucket_of, 2, seed=0, epoch=1)


# ------------------------------------------------------------------ bucketed training runs

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from flatlora_diffusion.data.batches import BatchMaker  # noqa: E402
from flatlora_diffusion.training.cli import run_training  # noqa: E402
from tests.training.test_training_script import args, assert_same_tensors, straight_and_resumed  # noqa: E402

SIZES = {"wide": (256, 120), "wide2": (250, 128), "tall": (100, 220), "square": (150, 150), "square2": (90, 96)}


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for name, (w, h) in SIZES.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def test_mixed_aspect_ratios_train_in_buckets(default_model_dir, mixed_dir, tmp_path, monkeypatch):
    seen = []
    original = BatchMaker.batch

    def record(self, stream, draws, generator):
        batch = original(self, stream, draws, generator)
        seen.append(([stream.examples[d.index].path.stem for d in draws], batch))
        return batch

    monkeypatch.setattr(BatchMaker, "batch", record)
    argv = args(default_model_dir, mixed_dir, tmp_path / "run", "--aspect_buckets", "--resolution", "128",
                "--train_batch_size", "2", "--max_train_steps", "4", "--center_crop")
    assert run_training(argv) == 0
    shapes = set()
    for names, batch in seen:
        shapes.add(tuple(batch.latents.shape[-2:]))
        for name, ids in zip(names, batch.time_ids.tolist()):
            w, h = SIZES[name]
            th, tw = ids[4], ids[5]
            assert ids[:2] == [h, w]  # original size as (h, w)
            assert th * tw <= 128 * 128 and th % 64 == 0 and tw % 64 == 0
            scale = max(tw / w, th / h)
            rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
            assert ids[2:4] == [(rh - th) // 2, (rw - tw) // 2]  # centre crop recorded
            assert (tw > th) == (w > h * 1.3) or abs(w - h) < 0.3 * max(w, h)
    assert len(shapes) >= 2  # landscape and portrait/square batches really happened


def test_bucketed_resume_is_exact(default_model_dir, mixed_dir, tmp_path):
    straight, resumed = straight_and_resumed(default_model_dir, mixed_dir, tmp_path, "--aspect_buckets",
                                             "--resolution", "128", "--train_batch_size", "2", "--random_flip")
    name = "pytorch_lora_weights.safetensors"
    assert_same_tensors(load_file(straight / name), load_file(resumed / name))


def test_class_images_are_bucketed_with_the_instance_batch(default_model_dir, mixed_dir, tmp_path):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    rng = np.random.default_rng(1)
    for k, (w, h) in enumerate([(256, 128), (128, 256), (128, 128)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(class_dir / f"c{k}.png")
    argv = args(default_model_dir, mixed_dir, tmp_path / "run", "--aspect_buckets", "--resolution", "128",
                "--max_train_steps", "3", "--with_prior_preservation", "--class_data_dir", class_dir,
                "--class_prompt", "a photo", "--num_class_images", "3")
    assert run_training(argv) == 0
