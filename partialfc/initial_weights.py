"""The head's initial class weights: the same matrix whatever the world size or the device.

Rank k builds only the rows of its class range (``init_rows(start, end, ...)``); rows are drawn in fixed
blocks of classes, each block from its own generator seeded from ``(seed, block)``, so a run on 2 ranks
starts where a run on 8 would, and a 10M-class shard is drawn by a pool of threads without ever being
whole in host memory when it lives on a GPU.
"""

from __future__ import annotations

import os

import torch

from partialfc.sampler import step_seed

# Initial weights are drawn in fixed blocks of classes, each from its own generator, so the initial
# matrix is the same whatever the world size (a run on 2 ranks starts where a run on 8 would).
_INIT_BLOCK = 4096


def init_rows(start: int, end: int, dim: int, seed: int, std: float, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32, threads: int | None = None) -> torch.Tensor:
    """Rows [start, end) of the initial class matrix, (end - start, dim), built on ``device``.

    Each block of ``_INIT_BLOCK`` classes is drawn on the CPU from its own generator (so the values
    do not depend on the device or the world size) by a pool of threads (``torch.randn`` releases
    the GIL; one thread draws ~80M values/s, and a 10M-class shard is 5G values) and copied into
    the result block by block, so a GPU shard never exists whole in host memory.
    """
    from concurrent.futures import ThreadPoolExecutor

    out = torch.empty(end - start, dim, device=device, dtype=dtype)
    first, last = start // _INIT_BLOCK, (end - 1) // _INIT_BLOCK if end > start else -1

    def fill(blk: int) -> None:
        g = torch.Generator().manual_seed(step_seed(seed, -1 - blk, 0x5EED))
        block = torch.randn(_INIT_BLOCK, dim, generator=g).mul_(std)
        lo, hi = max(start, blk * _INIT_BLOCK), min(end, (blk + 1) * _INIT_BLOCK)
        out[lo - start: hi - start].copy_(block[lo - blk * _INIT_BLOCK: hi - blk * _INIT_BLOCK])

    blocks = range(first, last + 1)
    # The CPUs this process may run on (a container may see more cores than it gets), at most 32.
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(threads or min(usable, 32), len(blocks))
    if workers <= 1:
        for blk in blocks:
            fill(blk)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill, blocks))
    return out


__all__ = ["init_rows"]
