"""The perturbed weight W + std·z, z ~ N(0, 1), from a seed: exact, private, and fast on a CPU.

On a CPU torch's normal_ (mt19937 + vectorised Box-Muller) is the fastest exact source measured
here (numpy's generators are 2-3x slower per core, bf16 draws are not faster, an in-house
Box-Muller is slower), but one generator runs on one core whatever torch's thread count. So the
weight, seen as (out, n) rows, is cut into fixed row blocks of about BLOCK_ELEMENTS numbers; block
i draws from its own generator seeded with block_seed(seed, i), and the blocks are filled by a
small thread pool (torch releases the GIL). Each worker draws its block in fp32 into a reused
buffer and writes W + std·z straight into the output with one rounding (fused addcmul), so no
weight-sized fp32 temporary exists. The values depend only on (seed, shape): not on the thread
or worker count, nor on which worker filled which block, nor on the process. The block size is
part of the noise's definition (torch's values for a draw depend on its length): never change it.

On CUDA one device generator per block draws the whole block at once (Philox; fast there), with
larger blocks so that the fp32 temporary stays small.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

BLOCK_ELEMENTS = 1 << 18  # CPU row blocks (~1 MiB of fp32): part of the noise's definition
CUDA_BLOCK_ELEMENTS = 1 << 22
MAX_WORKERS = 8
_MASK64 = (1 << 64) - 1

_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def block_seed(seed: int, block: int) -> int:
    """A 63-bit generator seed for row block `block` of a draw seeded with `seed` (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + (block + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def rows_per_block(n: int, device_type: str = "cpu") -> int:
    elements = CUDA_BLOCK_ELEMENTS if device_type == "cuda" else BLOCK_ELEMENTS
    return max(1, elements // max(n, 1))


def perturbed_weight(weight: torch.Tensor, row_std: torch.Tensor, seed: int) -> torch.Tensor:
    """W + row_std_i·z_ij in W's dtype and shape (one rounding from fp32), z from `seed` alone.

    `weight` is (out, ...) of any rank: row i is everything of output channel i.
    """
    out_rows = weight.shape[0]
    weight_2d = weight.detach().reshape(out_rows, -1)
    std = row_std.detach().reshape(out_rows, 1).to(weight.device, torch.float32)
    result = torch.empty_like(weight_2d, memory_format=torch.contiguous_format)
    step = rows_per_block(weight_2d.shape[1], weight.device.type)
    blocks = [(i, start, min(start + step, out_rows)) for i, start in enumerate(range(0, out_rows, step))]
    fill = _fill_block_cuda if weight.device.type == "cuda" else _fill_block_cpu
    workers = min(len(blocks), MAX_WORKERS, torch.get_num_threads()) if weight.device.type == "cpu" else 1
    groups = [blocks[worker::workers] for worker in range(max(workers, 1))]
    others = [_thread_pool().submit(_fill_blocks, fill, weight_2d, std, result, seed, group) for group in groups[1:]]
    _fill_blocks(fill, weight_2d, std, result, seed, groups[0])  # this thread works too
    for future in others:
        future.result()
    return result.view(weight.shape)


def _fill_blocks(fill, weight_2d, std, result, seed: int, blocks) -> None:
    for block in blocks:
        fill(weight_2d, std, result, seed, block)


def standard_normal(shape: tuple[int, ...], seed: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The z of perturbed_weight for a weight of `shape`, in fp32 (0 + 1·z is exact)."""
    zeros = torch.zeros(shape, dtype=torch.float32, device=device)
    return perturbed_weight(zeros, torch.ones(shape[0], device=device), seed)


def _fill_block_cpu(weight_2d, std, result, seed: int, block: tuple[int, int, int]) -> None:
    index, start, stop = block
    noise = _workspace(stop - start, weight_2d.shape[1])
    noise.normal_(generator=_thread_generator().manual_seed(block_seed(seed, index)))
    torch.addcmul(weight_2d[start:stop], std[start:stop], noise, out=result[start:stop])


def _fill_block_cuda(weight_2d, std, result, seed: int, block: tuple[int, int, int]) -> None:
    index, start, stop = block
    generator = _cuda_generator(weight_2d.device).manual_seed(block_seed(seed, index))
    noise = torch.randn((stop - start, weight_2d.shape[1]), generator=generator, device=weight_2d.device)
    torch.addcmul(weight_2d[start:stop], std[start:stop], noise, out=result[start:stop])


def _workspace(rows: int, cols: int) -> torch.Tensor:
    """A per-thread fp32 buffer, reused: fresh large allocations cost page faults on every draw."""
    buffer = getattr(_local, "workspace", None)
    if buffer is None or buffer.numel() < rows * cols:
        buffer = _local.workspace = torch.empty(max(rows * cols, BLOCK_ELEMENTS), dtype=torch.float32)
    return buffer[: rows * cols].view(rows, cols)


def _thread_generator() -> torch.Generator:
    generator = getattr(_local, "generator", None)
    if generator is None:
        generator = _local.generator = torch.Generator()
    return generator


def _cuda_generator(device: torch.device) -> torch.Generator:
    generators = getattr(_local, "cuda_generators", None)
    if generators is None:
        generators = _local.cuda_generators = {}
    if device not in generators:
        generators[device] = torch.Generator(device=device)
    return generators[device]


def _forget_threads_after_fork() -> None:
    """A forked child (a DataLoader worker) has none of the parent's pool threads: start afresh."""
    global _local, _pool
    _local, _pool = threading.local(), None


os.register_at_fork(after_in_child=_forget_threads_after_fork)


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="flatlora-noise")
        return _pool
