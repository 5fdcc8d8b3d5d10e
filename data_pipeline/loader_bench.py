"""Loader throughput against the raw decode ceiling (``pfc bench data``).

In one run: (1) images/s through the whole loader (record reads, decode, flip, batching, hand-over
to the consumer as torch tensors: uint8 pixels as the trainer takes them, or with ``uint8=False``
float32 normalised on the loader's CPU as before), and (2) the decode ceiling
(:mod:`data_pipeline.decode_ceiling`): the same JPEG bytes, already in memory, decoded in a tight loop
by the same decoder with the same parallelism. ratio = loader / ceiling says how much the loader loses
to everything that is not decoding. One process, rank 0 of a world of 1.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from data_pipeline.decode_ceiling import DaliCeiling, pil_ceiling, sample_jpegs
from data_pipeline.insightface import InsightFaceReader

__all__ = ["DataBenchResult", "bench_data", "endless", "load_average", "timed_slice"]


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
    batches (images first) for `seconds`: returns (images, wall seconds)."""
    for _ in range(warmup_batches):
        next(batches)
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        images = next(batches)[0]  # (images, labels) or, DALI uint8, (pixels, labels, flips)
        if sync is not None:
            sync(images)
        done += int(images.shape[0])
    return done, time.perf_counter() - t0



@dataclass
class _Contestants:
    """The loader under test and its ceiling: epochs of batches, batches prefetched before timing,
    the ceiling (seconds -> (images, wall s)), a device sync per batch, the device, and what to drop
    at the end so the loader's worker processes exit (and their CPU time is counted)."""

    make_epoch: Callable[[int], Iterable[Any]]
    warmup: int
    ceiling: Callable[[float], tuple[int, float]]
    device: str = "cpu"
    sync: Callable[[Any], None] | None = None
    owned: list[Any] = field(default_factory=list)


def _torch_contestants(reader: InsightFaceReader, jpegs: list[bytes], threads: int, batch_size: int,
                       uint8: bool) -> _Contestants:
    from data_pipeline.dataset import build_dataloader

    prefetch = 4
    tl = build_dataloader(reader, batch_size, 0, 1, seed=0, workers=threads, persistent_workers=threads > 0,
                          prefetch_factor=prefetch, uint8=uint8)

    def make_epoch(e: int) -> Iterable[Any]:
        tl.set_epoch(e)
        return tl

    def ceiling(sec: float) -> tuple[int, float]:
        return pil_ceiling(jpegs, threads, sec)

    return _Contestants(make_epoch, prefetch * max(threads, 1) + 1, ceiling, owned=[tl])


def _dali_contestants(reader: InsightFaceReader, jpegs: list[bytes], threads: int, batch_size: int,
                      uint8: bool, device_id: int | None) -> _Contestants:
    from data_pipeline.dali_iterator import DaliLoader

    dl = DaliLoader(reader, batch_size, 0, 1, seed=0, threads=threads, device_id=device_id, uint8=uint8)

    def make_epoch(e: int) -> Iterable[Any]:
        dl.set_epoch(e)
        return dl

    sync: Callable[[Any], None] | None = None
    if device_id is not None:
        import torch

        def sync(_: Any) -> None:
            torch.cuda.synchronize(device_id)

    return _Contestants(make_epoch, dl.prefetch_queue_depth + 1, DaliCeiling(jpegs, threads, batch_size, device_id),
                        "cpu" if device_id is None else f"cuda:{device_id}", sync)


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
    if loader == "torch":
        c = _torch_contestants(reader, jpegs, threads, batch_size, uint8)
    elif loader == "dali":
        c = _dali_contestants(reader, jpegs, threads, batch_size, uint8, device_id)
    else:
        raise ValueError(f"unknown loader {loader!r}: expected 'dali' or 'torch'")
    fig = _alternate(c, seconds / rounds, rounds, settle_s, batch_size, loader == "torch")
    rate, ceil_rate = fig["n_load"] / fig["t_load"], fig["n_ceil"] / fig["t_ceil"]
    load_ms, ceil_ms = 1e3 * fig["cpu_load"] / fig["n_all"], 1e3 * fig["cpu_ceil"] / fig["n_ceil"]
    return DataBenchResult(loader=loader, prefix=str(prefix), threads=threads, batch_size=batch_size,
                           seconds=fig["t_load"], images=fig["n_load"], images_per_s=rate,
                           decode_ceiling_images_per_s=ceil_rate, ratio=rate / ceil_rate,
                           round_ratios=fig["per_round"], loader_cpu_ms_per_image=load_ms,
                           ceiling_cpu_ms_per_image=ceil_ms, cpu_ratio=ceil_ms / load_ms,
                           image_size=reader.image_size, handover="uint8" if uint8 else "float32", device=c.device,
                           cpu_count=os.cpu_count() or 1, load_average=load_average())


def _alternate(c: _Contestants, slice_s: float, rounds: int, settle_s: float, batch_size: int,
               workers_are_children: bool) -> dict[str, Any]:
    """The timed rounds: loader slice, settle, ceiling slice; images, seconds and CPU seconds of each.
    ``workers_are_children``: the loader's workers are child processes (torch), whose CPU time is
    counted once they have exited."""
    batches = endless(c.make_epoch)
    n_load = n_ceil = n_all = 0
    t_load = t_ceil = 0.0
    cpu_main_load = cpu_ceil = 0.0
    kids0 = _children_cpu()
    per_round: list[float] = []
    for _ in range(rounds):
        c0 = time.process_time()
        n, t = timed_slice(batches, slice_s, c.warmup, c.sync)
        time.sleep(settle_s)
        c1 = time.process_time()
        k1 = _children_cpu()
        m, u = c.ceiling(slice_s)
        cpu_ceil += (time.process_time() - c1) + (_children_cpu() - k1)
        cpu_main_load += c1 - c0
        n_load, t_load, n_ceil, t_ceil = n_load + n, t_load + t, n_ceil + m, t_ceil + u
        n_all += n + c.warmup * batch_size
        per_round.append((n / t) / (m / u))
    batches.close()
    if workers_are_children:
        c.owned.clear()  # shuts the DataLoader workers down, so their CPU time is accounted
        c.make_epoch = _no_epoch
        gc.collect()
    # children: the DataLoader workers (torch) and the ceiling's process pools, counted in cpu_ceil
    cpu_workers = _children_cpu() - kids0 - (cpu_ceil if workers_are_children else 0.0)
    cpu_load = cpu_main_load + (cpu_workers if workers_are_children else 0.0)
    return {"n_load": n_load, "t_load": t_load, "n_ceil": n_ceil, "t_ceil": t_ceil, "n_all": n_all,
            "cpu_load": cpu_load, "cpu_ceil": cpu_ceil, "per_round": per_round}


def _no_epoch(e: int) -> Iterable[Any]:
    return ()


def _children_cpu() -> float:
    """CPU seconds of this process's finished (joined) child processes."""
    try:
        import resource
    except ImportError:
        return 0.0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def load_average() -> float | None:
    """1-minute load average (how busy the machine was), where the OS reports it."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None

