"""The decode ceiling of ``pfc bench data``: the same JPEG bytes, already in memory, decoded in a tight loop
by the loader's own decoder with the loader's parallelism.

* ``torch``: PIL in T worker processes (the loader's T DataLoader workers), each decoding to an RGB
  array (H, W, 3) uint8 with :func:`data_pipeline.dataset.decode_rgb` and nothing else;
* ``dali``: DALI's CPU (or mixed) image decoder with ``num_threads=T``, fed by ``external_source``.

One process (rank 0 of nothing: the bench runs alone); each ceiling returns (images decoded, wall s).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipeline.dataset import decode_rgb
from data_pipeline.insightface import InsightFaceReader

__all__ = ["DaliCeiling", "pil_ceiling", "sample_jpegs"]


def sample_jpegs(reader: InsightFaceReader, count: int) -> list[bytes]:
    """`count` encoded images spread evenly over the dataset (for the decode ceiling)."""
    n = len(reader)
    picks = np.linspace(0, n - 1, num=min(count, n)).astype(np.int64)
    return [reader.read_image(int(reader.image_key_array[int(i)]))[1] for i in picks]


def _pil_worker(args: tuple[Sequence[bytes], float, Any, Any]) -> int:
    jpegs, seconds, start, _ = args
    start.wait()
    done = 0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        for p in jpegs:
            decode_rgb(p)
        done += len(jpegs)
    return done


def pil_ceiling(jpegs: Sequence[bytes], threads: int, seconds: float) -> tuple[int, float]:
    """PIL decoding `jpegs` in `threads` processes (0: this process), each in a tight loop for
    `seconds`: returns (images decoded, wall seconds)."""
    if threads <= 0:
        t0 = time.perf_counter()
        done = 0
        while time.perf_counter() - t0 < seconds:
            for p in jpegs:
                decode_rgb(p)
            done += len(jpegs)
        return done, time.perf_counter() - t0
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Manager() as manager:
        start = manager.Barrier(threads + 1)
        with ctx.Pool(threads) as pool:
            res = pool.map_async(_pil_worker, [(list(jpegs), seconds, start, i) for i in range(threads)],
                                 chunksize=1)
            start.wait()          # every worker is up: time only the decoding
            t0 = time.perf_counter()
            counts = res.get()
            wall = time.perf_counter() - t0
    return sum(counts), wall


class DaliCeiling:
    """DALI's image decoder (num_threads=`threads`) on `jpegs` fed from memory, built once."""

    def __init__(self, jpegs: Sequence[bytes], threads: int, batch_size: int, device_id: int | None = None):
        from data_pipeline.dali_pipeline import build_decode_pipeline

        arrays = [np.frombuffer(p, dtype=np.uint8) for p in jpegs]
        self.batch_size = batch_size
        self.device_id = device_id
        pos = 0

        def source() -> list[np.ndarray]:
            nonlocal pos
            out = [arrays[(pos + i) % len(arrays)] for i in range(batch_size)]
            pos = (pos + batch_size) % len(arrays)
            return out

        self.pipe = build_decode_pipeline(batch_size, threads, device_id, source)
        for _ in range(3):   # warm-up: allocations, thread start
            self.pipe.run()

    def __call__(self, seconds: float) -> tuple[int, float]:
        """Decode for `seconds`: (images, wall seconds)."""
        done = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            (out,) = self.pipe.run()
            if self.device_id is not None:
                out.as_cpu()    # wait for the GPU work as the loader's consumer would
            done += self.batch_size
        return done, time.perf_counter() - t0
