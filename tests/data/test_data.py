"""Image reading and DreamBooth augmentation (issue 4 data bullet)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flatlora_diffusion.data.examples import epoch_order, load_examples, prepare_image
from flatlora_diffusion.data.images import load_rgb
from flatlora_diffusion.errors import UserError


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (40, 20), "red")
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    loaded = load_rgb(tmp_path / "rot.jpg")
    assert loaded.size == (20, 40)
    top = np.asarray(loaded)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the blue strip is now on top


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16", "P", "LA"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    ext = "tif" if mode in ("CMYK", "I;16") else "png"
    if mode == "I;16":
        img = Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16))
    else:
        img = Image.new(mode, (64, 64))
    img.save(tmp_path / f"x.{ext}")
    loaded = load_rgb(tmp_path / f"x.{ext}")
    assert loaded.mode == "RGB" and loaded.size == (64, 64)
    if mode == "I;16":
        assert np.asarray(loaded).max() > 200  # 16-bit range scaled, not clipped to black/white


def test_rgba_composited_on_white(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "t.png")
    assert tuple(np.asarray(load_rgb(tmp_path / "t.png"))[0, 0]) == (255, 255, 255)


def test_corrupt_file_is_named(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(UserError, match="bad.png"):
        load_examples(tmp_path, "a sks")


def test_crop_and_flip_are_deterministic_and_recorded():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    a = prepare_image(img, 32, center_crop=False, random_flip=True, seed=1, epoch=0, index=2)
    b = prepare_image(img, 32, center_crop=False, random_flip=True, seed=1, epoch=0, index=2)
    assert (a.pixels == b.pixels).all() and a.crop_top_left == b.crop_top_left
    assert a.original_size == (60, 90) and a.target_size == (32, 32)
    assert a.time_ids.tolist() == [60, 90, *a.crop_top_left, 32, 32]
    flips = {prepare_image(img, 32, False, True, 1, epoch, 2).flipped for epoch in range(20)}
    assert flips == {True, False}  # drawn per sample per epoch
    centre = prepare_image(img, 32, center_crop=True, random_flip=False, seed=1, epoch=0, index=2)
    assert centre.crop_top_left == (0, (48 - 32) // 2)


def test_epoch_order_is_a_permutation_that_changes_per_epoch():
    a, b = epoch_order(10, 0, 0), epoch_order(10, 0, 1)
    assert sorted(a) == list(range(10)) and not (a == b).all() and (a == epoch_order(10, 0, 0)).all()
