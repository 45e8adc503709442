"""The on-disk latent cache: keys, invalidation, corrupt and stale entries (issue 16 item 3)."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from flatlora_diffusion.data.examples import plan_crop
from flatlora_diffusion.data.latent_cache import DiskLatentCache, vae_identity


@pytest.fixture(scope="module")
def vae(default_model_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(default_model_dir / "vae")


@pytest.fixture
def image(tmp_path):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    return tmp_path / "a.png"


def entry(shape=(4, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.rand(shape, generator=g)


def test_entry_round_trips_bit_exactly(tmp_path, vae, image):
    cache = DiskLatentCache(tmp_path / "cache", vae)
    key = cache.key(image, (32, 32), plan_crop((30, 40), (32, 32), False, True, 0, 0, 0))
    assert cache.load(key, (4, 4, 4)) is None
    mean, std = entry()
    cache.save(key, mean, std)
    got = cache.load(key, (4, 4, 4))
    assert torch.equal(got[0], mean) and torch.equal(got[1], std)
    assert not list(cache.path(key).parent.glob(".*tmp"))


def test_key_changes_with_image_content_size_crop_flip_and_vae(tmp_path, vae, image):
    cache = DiskLatentCache(tmp_path / "cache", vae)
    plan = plan_crop((30, 40), (32, 32), False, False, 0, 0, 0)
    base = cache.path(cache.key(image, (32, 32), plan))
    other_crop = next(p for e in range(20) if (p := plan_crop((30, 40), (32, 32), False, False, 0, e, 0)) != plan)
    flipped = plan_crop((30, 40), (32, 32), False, True, 0, next(e for e in range(20) if plan_crop(
        (30, 40), (32, 32), False, True, 0, e, 0).flipped), 0)
    others = [cache.key(image, (24, 32), plan_crop((30, 40), (24, 32), False, False, 0, 0, 0)),
              cache.key(image, (32, 32), other_crop), cache.key(image, (32, 32), flipped)]
    assert len({base, *(cache.path(k) for k in others)}) == 4
    copy = tmp_path / "copy.png"
    shutil.copy(image, copy)
    assert cache.path(cache.key(copy, (32, 32), plan)) == base  # content, not the file name
    Image.new("RGB", (40, 30), "blue").save(tmp_path / "changed.png")
    changed = DiskLatentCache(tmp_path / "cache", vae)  # a new run hashes files afresh
    assert changed.path(changed.key(tmp_path / "changed.png", (32, 32), plan)) != base
    other_vae = type(vae).from_config(vae.config)
    other_vae.load_state_dict(vae.state_dict())
    assert vae_identity(other_vae) == vae_identity(vae)
    with torch.no_grad():
        next(other_vae.parameters()).view(-1)[0] += 1e-3
    assert vae_identity(other_vae) != vae_identity(vae)
    other_cache = DiskLatentCache(tmp_path / "cache", other_vae)
    assert other_cache.path(other_cache.key(image, (32, 32), plan)) != base
    half = type(vae).from_config(vae.config)
    half.load_state_dict(vae.state_dict())
    assert vae_identity(half.to(torch.float16)) != vae_identity(vae)  # the precision it runs in counts


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "wrong shape", "nan", "stale"])
def test_corrupt_or_stale_entries_are_never_used(tmp_path, vae, image, damage):
    cache = DiskLatentCache(tmp_path / "cache", vae)
    key = cache.key(image, (32, 32), plan_crop((30, 40), (32, 32), True, False, 0, 0, 0))
    path = cache.path(key)
    mean, std = entry()
    cache.save(key, mean, std)
    if damage == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "wrong shape":
        cache.save(key, *entry((4, 2, 2)))
    elif damage == "nan":
        cache.save(key, mean * float("nan"), std)
    else:  # another key's entry under this name
        other = cache.key(image, (24, 24), plan_crop((30, 40), (24, 24), True, False, 0, 0, 0))
        cache.save(other, mean, std)
        shutil.copy(cache.path(other), path)
    assert cache.load(key, (4, 4, 4)) is None
    cache.save(key, mean, std)  # recomputed values overwrite the entry
    assert torch.equal(cache.load(key, (4, 4, 4))[0], mean)
