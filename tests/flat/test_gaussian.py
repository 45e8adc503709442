"""The noise source: N(0, 1), determined by (seed, step, rank, layer) alone, fast paths exact."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from flatlora_diffusion.flat.flat_lora import layer_seed
from flatlora_diffusion.flat.gaussian import BLOCK_ELEMENTS, perturbed_weight, rows_per_block, standard_normal

SHAPE = (1024, 1024)  # four row blocks: the block seeds are exercised too


def _z(step=0, rank=0, name="unet.a", seed=0, shape=SHAPE):
    return standard_normal(shape, layer_seed(seed, step, rank, name)).flatten().double().numpy()


def test_draws_are_standard_normal():
    z = _z()
    n = z.size
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs(stats.skew(z)) < 5 * np.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 5 * np.sqrt(24 / n)  # excess kurtosis of a Gaussian is 0
    assert stats.kstest(z, "norm").pvalue > 1e-3
    for block in np.split(z, 4):  # each row block on its own, too
        assert stats.kstest(block, "norm").pvalue > 1e-3


def test_no_correlation_between_layers_steps_ranks_and_blocks():
    base = _z()
    others = [_z(name="unet.b"), _z(step=1), _z(rank=1), _z(seed=1)]
    bound = 5 / np.sqrt(base.size)
    for other in others:
        assert abs(np.corrcoef(base, other)[0, 1]) < bound
    blocks = np.split(base, 4)
    for i in range(3):
        assert abs(np.corrcoef(blocks[i], blocks[i + 1])[0, 1]) < 5 / np.sqrt(blocks[0].size)
    # the same stream shifted by a row is not the next row: no overlap between blocks either
    assert not np.allclose(blocks[0][:1024], blocks[1][:1024])


def test_perturbed_weight_is_w_plus_std_times_z_with_one_rounding():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 1000, generator=g).bfloat16()
    std = torch.rand(300, generator=g)
    got = perturbed_weight(weight, std, 7)
    exact = weight.double() + std[:, None].double() * standard_normal(tuple(weight.shape), 7).double()
    assert got.dtype == torch.bfloat16 and torch.equal(got, exact.bfloat16())  # rounded once, from fp32


@pytest.mark.parametrize("threads", [2, 4])
def test_identical_at_any_thread_count(threads):
    weight = torch.randn(700, 900)  # a partial last block
    std = torch.rand(700)
    assert rows_per_block(900) * 900 <= BLOCK_ELEMENTS and 700 > rows_per_block(900)
    before = torch.get_num_threads()
    serial = perturbed_weight(weight, std, 11)
    try:
        torch.set_num_threads(threads)
        parallel = perturbed_weight(weight, std, 11)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(serial, parallel)


def test_identical_after_a_restart_with_other_threads_and_global_rng_untouched():
    def digest(tensor):
        return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()

    state = torch.get_rng_state()
    here = digest(standard_normal((600, 1000), layer_seed(3, 7, 0, "x.fc1")))
    assert torch.equal(state, torch.get_rng_state())
    code = ("import hashlib, torch; torch.set_num_threads(2);"
            "from flatlora_diffusion.flat.gaussian import standard_normal;"
            "from flatlora_diffusion.flat.flat_lora import layer_seed;"
            "z = standard_normal((600, 1000), layer_seed(3, 7, 0, 'x.fc1'));"
            "print(hashlib.sha256(z.numpy().tobytes()).hexdigest())")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert there.strip() == here
