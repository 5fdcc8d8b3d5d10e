"""Loader throughput against the raw decode ceiling (``pfc bench data``).

In one run: (1) images/s through the whole loader (record reads, decode, flip, batching, hand-over
to the consumer as torch tensors: uint8 pixels as the trainer takes them, or with ``uint8=False``
float32 normalised on the loader's CPU as before), and (2) the decode ceiling: the same JPEG
bytes, already in memory, decoded in a tight loop by the same decoder with the same parallelism:

* ``torch``: PIL in T worker processes (the loader's T DataLoader workers), each decoding to an RGB
  array and nothing else;
* ``dali``: DALI's CPU (or mixed) image decoder with ``num_threads=T``, fed by ``external_source``.

ratio = loader / ceiling says how much the loader loses to everything that is not decoding.
"""

from __future__ import annotations

import gc
import io
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from data_pipeline.insightface import InsightFaceReader


@dataclass
class DataBenchResult:
    loader: str
    prefix: str
    threads: int
    batch_size: int
    seconds: float
    images: int
    images_per_s: float
    decode_ceiling_images_per_s: float
    ratio: float
    round_ratios: list[float]
    # CPU cost per image of each (all processes and threads): a contention-robust view on a shared
    # machine; the loader's count includes the prefetched batches drained untimed between slices
    loader_cpu_ms_per_image: float
    ceiling_cpu_ms_per_image: float
    cpu_ratio: float
    image_size: tuple[int, int]
    handover: str  # "uint8" (B, H, W, 3) pixels, or "float32" (B, 3, H, W) in [-1, 1]
    device: str
    cpu_count: int
    load_average: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_jpegs(reader: InsightFaceReader, count: int) -> list[bytes]:
    """`count` encoded images spread evenly over the dataset (for the decode ceiling)."""
    n = len(reader)
    picks = np.linspace(0, n - 1, num=min(count, n)).astype(np.int64)
    return [reader.read_image(reader.image_keys[int(i)])[1] for i in picks]


def pil_decode(payload: bytes) -> np.ndarray:
    """What the torch path's decoder does to one JPEG: bytes -> (H, W, 3) uint8 RGB."""
    with Image.open(io.BytesIO(payload)) as im:
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def _pil_worker(args: tuple[Sequence[bytes], float, Any, Any]) -> int:
    jpegs, seconds, start, _ = args
    start.wait()
    done = 0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        for p in jpegs:
            pil_decode(p)
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
                pil_decode(p)
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


def endless(make_epoch: Callable[[int], Iterable[Any]]) -> Generator[Any, None, None]:
    """Batches of epoch 0, 1, 2, ... without end."""
    epoch = 0
    while True:
        got = False
        for batch in make_epoch(epoch):
            got = True
            yield batch
        if not got:
            raise ValueError("the loader yields no batches: dataset smaller than one batch per rank?")
        epoch += 1


def timed_slice(batches: Iterator[Any], seconds: float, warmup_batches: int,
                sync: Callable[[Any], None] | None = None) -> tuple[int, float]:
    """Skip `warmup_batches` (what the loader prefetched while it was not being timed), then consume
    batches (images, labels) for `seconds`: returns (images, wall seconds)."""
    for _ in range(warmup_batches):
        next(batches)
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        images, _labels = next(batches)
        if sync is not None:
            sync(images)
        done += int(images.shape[0])
    return done, time.perf_counter() - t0


def bench_data(prefix: str | os.PathLike[str], loader: str = "torch", threads: int = 2, batch_size: int = 128,
               seconds: float = 10.0, device_id: int | None = None, ceiling_images: int = 512,
               rounds: int = 3, settle_s: float = 1.0, uint8: bool = True) -> DataBenchResult:
    """Measure loader images/s and the decode ceiling in the same run (see the module docstring).

    ``uint8`` (default): the loader hands batches over as the trainer takes them, uint8 pixels that
    the training step normalises on its device; False: the former float32 [-1, 1] hand-over, whose
    conversion ran on the loader's CPU.

    The `seconds` of each are split into `rounds` alternating slices (loader, ceiling, loader, ...),
    so that load from other processes on a shared machine hits both alike. Between slices the
    loader's prefetch queue is left to fill (`settle_s`), and drained untimed before its next slice,
    so it neither competes with the ceiling nor is credited with work done off the clock.
    """
    reader = InsightFaceReader(prefix)
    jpegs = sample_jpegs(reader, ceiling_images)
    sync: Callable[[Any], None] | None = None
    ceiling: Callable[[float], tuple[int, float]]
    if loader == "torch":
        from data_pipeline.dataset import build_dataloader

        prefetch = 4
        tl = build_dataloader(reader, batch_size, 0, 1, seed=0, workers=threads, persistent_workers=threads > 0,
                              prefetch_factor=prefetch, uint8=uint8)

        def make_epoch(e: int) -> Iterable[Any]:
            tl.set_epoch(e)
            return tl

        warmup = prefetch * max(threads, 1) + 1

        def ceiling(sec: float) -> tuple[int, float]:
            return pil_ceiling(jpegs, threads, sec)

        device = "cpu"
    elif loader == "dali":
        from data_pipeline.dali_iterator import DaliLoader

        dl = DaliLoader(reader, batch_size, 0, 1, seed=0, threads=threads, device_id=device_id, uint8=uint8)

        def make_epoch(e: int) -> Iterable[Any]:
            dl.set_epoch(e)
            return dl

        warmup = dl.prefetch_queue_depth + 1
        if device_id is not None:
            import torch

            def sync(_: Any) -> None:
                torch.cuda.synchronize(device_id)

        ceiling = DaliCeiling(jpegs, threads, batch_size, device_id)
        device = "cpu" if device_id is None else f"cuda:{device_id}"
    else:
        raise ValueError(f"unknown loader {loader!r}: expected 'dali' or 'torch'")
    batches = endless(make_epoch)
    slice_s = seconds / rounds
    n_load = n_ceil = n_all = 0
    t_load = t_ceil = 0.0
    cpu_main_load = cpu_ceil = 0.0
    kids0 = _children_cpu()
    per_round: list[float] = []
    for _ in range(rounds):
        c0 = time.process_time()
        n, t = timed_slice(batches, slice_s, warmup, sync)
        time.sleep(settle_s)
        c1 = time.process_time()
        k1 = _children_cpu()
        m, u = ceiling(slice_s)
        cpu_ceil += (time.process_time() - c1) + (_children_cpu() - k1)
        cpu_main_load += c1 - c0
        n_load, t_load, n_ceil, t_ceil = n_load + n, t_load + t, n_ceil + m, t_ceil + u
        n_all += n + warmup * batch_size
        per_round.append((n / t) / (m / u))
    batches.close()
    if loader == "torch":
        del tl, make_epoch   # shuts the DataLoader workers down, so their CPU time is accounted
        gc.collect()
    # children: the DataLoader workers (torch) and the ceiling's process pools, counted in cpu_ceil
    cpu_workers = _children_cpu() - kids0 - (cpu_ceil if loader == "torch" else 0.0)
    cpu_load = cpu_main_load + (cpu_workers if loader == "torch" else 0.0)
    rate, ceil_rate = n_load / t_load, n_ceil / t_ceil
    load_ms, ceil_ms = 1e3 * cpu_load / n_all, 1e3 * cpu_ceil / n_ceil
    return DataBenchResult(loader=loader, prefix=str(prefix), threads=threads, batch_size=batch_size,
                           seconds=t_load, images=n_load, images_per_s=rate,
                           decode_ceiling_images_per_s=ceil_rate, ratio=rate / ceil_rate,
                           round_ratios=per_round, loader_cpu_ms_per_image=load_ms,
                           ceiling_cpu_ms_per_image=ceil_ms, cpu_ratio=ceil_ms / load_ms,
                           image_size=reader.image_size, handover="uint8" if uint8 else "float32", device=device,
                           cpu_count=os.cpu_count() or 1, load_average=_load_average())


def _children_cpu() -> float:
    """CPU seconds of this process's finished (joined) child processes."""
    try:
        import resource
    except ImportError:
        return 0.0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _load_average() -> float | None:
    """1-minute load average (how busy the machine was), where the OS reports it."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
