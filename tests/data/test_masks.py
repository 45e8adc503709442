"""Masked loss: masks follow their image's crop and flip; only the masked region trains (issue 16 item 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flatlora_diffusion.data.examples import Example, prepare_image
from flatlora_diffusion.data.images import list_images
from flatlora_diffusion.data.masks import attach_masks, find_mask, latent_mask, pixel_mask
from flatlora_diffusion.errors import UserError
from flatlora_diffusion.training.losses import per_sample_mse


def _subject_and_mask(tmp_path, width=90, height=60):
    """An image whose red pixels are exactly its mask's white pixels (an off-centre blob)."""
    rng = np.random.default_rng(0)
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[..., 2] = 200
    subject = np.zeros((height, width), dtype=bool)
    subject[5:40, 8:38] = True
    subject[20:55, 60:70] = True
    array[subject] = (250, 0, 0)
    array[~subject, 1] = rng.integers(0, 60, (~subject).sum())
    Image.fromarray(array).save(tmp_path / "photo.png")
    Image.fromarray(subject.astype(np.uint8) * 255).save(tmp_path / "photo.mask.png")
    return Example(tmp_path / "photo.png", "sks", (height, width), mask=tmp_path / "photo.mask.png")


@pytest.mark.parametrize("size", [(32, 32), (40, 64), (64, 40)])  # square crop and two buckets
def test_mask_is_cut_exactly_as_its_image(tmp_path, size):
    example = _subject_and_mask(tmp_path)
    image = Image.open(example.path).convert("RGB")
    flips = set()
    for epoch in range(8):
        prepared = prepare_image(image, size, center_crop=False, random_flip=True, seed=3, epoch=epoch, index=1)
        mask = pixel_mask(example, size, center_crop=False, random_flip=True, seed=3, epoch=epoch, index=1)[0]
        red = (prepared.pixels[0] > 0.5) & (prepared.pixels[2] < -0.5)
        sure = (mask > 0.9) | (mask < 0.1)  # away from the blob's resampled edges
        assert mask.shape == size and sure.float().mean() > 0.8
        assert torch.equal(red[sure], (mask > 0.5)[sure])
        flips.add(prepared.flipped)
    assert flips == {True, False}


def test_latent_mask_is_the_white_fraction_of_each_patch():
    mask = torch.zeros(1, 16, 24)
    mask[:, :8, :8] = 1.0
    mask[:, 8:, 8:12] = 1.0
    small = latent_mask(mask, (2, 3))
    assert small.tolist() == [[[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]]]


def test_masked_loss_depends_on_the_masked_region_only():
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(2, 4, 6, 6, generator=g, requires_grad=True)
    target = torch.randn(2, 4, 6, 6, generator=g)
    mask = torch.zeros(2, 1, 6, 6)
    mask[0, :, 1:4, 2:5] = 1.0
    mask[1, :, 3:, :] = 0.5

    def loss_and_grad(t):
        weights.grad = None
        loss = per_sample_mse(weights * 2.0, t, mask)
        loss.sum().backward()
        return loss.detach(), weights.grad.clone()

    loss, grad = loss_and_grad(target)
    outside = target + 5.0 * (mask == 0).float()
    loss_out, grad_out = loss_and_grad(outside)
    assert torch.equal(loss, loss_out) and torch.equal(grad, grad_out)
    assert (grad * (mask == 0)).abs().max() == 0 and (grad * (mask > 0)).abs().max() > 0
    inside = target + 5.0 * (mask > 0).float()
    assert not torch.allclose(loss_and_grad(inside)[0], loss)
    error = (weights.detach() * 2.0 - target).square()
    expected_0 = error[0, :, 1:4, 2:5].mean()  # the mean over the masked pixels, not over the image
    assert torch.allclose(loss[0], expected_0)
    assert torch.allclose(per_sample_mse(weights * 2.0, target, torch.ones(2, 1, 6, 6)),
                          per_sample_mse(weights * 2.0, target))


def test_masks_are_found_beside_or_in_a_masks_folder_and_never_trained_on(tmp_path):
    for name in ("a", "b", "c"):
        Image.new("RGB", (16, 8)).save(tmp_path / f"{name}.png")
    Image.new("L", (16, 8), 255).save(tmp_path / "a.mask.png")
    (tmp_path / "masks").mkdir()
    Image.new("L", (16, 8), 255).save(tmp_path / "masks" / "b.jpg")
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.png", "c.png"]
    assert find_mask(tmp_path / "a.png").name == "a.mask.png"
    assert find_mask(tmp_path / "b.png") == tmp_path / "masks" / "b.jpg"
    examples, summary = attach_masks([Example(tmp_path / f"{n}.png", "x", (8, 16)) for n in "abc"])
    assert [e.mask is not None for e in examples] == [True, True, False]
    assert summary == "masked loss: 2 of 3 instance images have a mask; 1 train everywhere"
    assert pixel_mask(examples[2], (8, 8), True, False, 0, 0, 2).eq(1).all()


def test_bad_masks_are_clear_errors(tmp_path):
    Image.new("RGB", (16, 8)).save(tmp_path / "a.png")
    with pytest.raises(UserError, match="no instance image has a mask"):
        attach_masks([Example(tmp_path / "a.png", "x", (8, 16))])
    Image.new("L", (10, 10)).save(tmp_path / "a.mask.png")
    with pytest.raises(UserError, match="a.mask.png is 10x10, its image is 16x8"):
        attach_masks([Example(tmp_path / "a.png", "x", (8, 16))])
    (tmp_path / "a.mask.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(UserError, match="cannot read mask"):
        attach_masks([Example(tmp_path / "a.png", "x", (8, 16))])
