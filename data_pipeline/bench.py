"""Loader throughput against the raw decode ceiling (``pfc bench data``).

In one run: (1) images/s through the whole loader (record reads, decode, flip, normalisation,
batching, hand-over to the consumer as torch tensors), and (2) the decode ceiling: the same JPEG
bytes, already in memory, decoded in a tight loop by the same decoder with the same parallelism:

* ``torch``: PIL in T worker processes (the loader's T DataLoader workers), each decoding to an RGB
  array and nothing else;
* ``dali``: DALI's CPU (or mixed) image decoder with ``num_threads=T``, fed by ``external_source``.

ratio = loader / ceiling says how much the loader loses to everything that is not decoding.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterable, Sequence
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
    image_size: tuple[int, int]
    device: str
    cpu_count: int

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


def pil_ceiling(jpegs: Sequence[bytes], threads: int, seconds: float) -> float:
    """Images/s of PIL decoding `jpegs` in `threads` processes, each in a tight loop for `seconds`."""
    if threads <= 0:
        t0 = time.perf_counter()
        done = 0
        while time.perf_counter() - t0 < seconds:
            for p in jpegs:
                pil_decode(p)
            done += len(jpegs)
        return done / (time.perf_counter() - t0)
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
    return sum(counts) / wall


def dali_ceiling(jpegs: Sequence[bytes], threads: int, batch_size: int, seconds: float,
                 device_id: int | None = None) -> float:
    """Images/s of DALI's image decoder (num_threads=`threads`) on `jpegs` fed from memory."""
    from data_pipeline.dali_pipeline import build_decode_pipeline

    arrays = [np.frombuffer(p, dtype=np.uint8) for p in jpegs]
    pos = 0

    def source() -> list[np.ndarray]:
        nonlocal pos
        out = [arrays[(pos + i) % len(arrays)] for i in range(batch_size)]
        pos = (pos + batch_size) % len(arrays)
        return out

    pipe = build_decode_pipeline(batch_size, threads, device_id, source)
    for _ in range(3):   # warm-up: allocations, thread start
        pipe.run()
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        (out,) = pipe.run()
        if device_id is not None:
            out.as_cpu()    # wait for the GPU work as the loader's consumer would
        done += batch_size
    wall = time.perf_counter() - t0
    del pipe
    return done / wall


def timed_iteration(make_epoch: Callable[[int], Iterable[Any]], seconds: float, warmup_batches: int = 3,
                    sync: Callable[[Any], None] | None = None) -> tuple[int, float]:
    """Consume batches (images, labels) from successive epochs for `seconds` after `warmup_batches`.

    Returns (images, wall seconds). `make_epoch(e)` returns the iterable of epoch e."""
    epoch = 0
    seen = 0
    t0: float | None = None
    done = 0
    while True:
        for images, _labels in make_epoch(epoch):
            if sync is not None:
                sync(images)
            seen += 1
            if seen == warmup_batches:
                t0 = time.perf_counter()
                continue
            if t0 is not None:
                done += int(images.shape[0])
                if time.perf_counter() - t0 >= seconds:
                    return done, time.perf_counter() - t0
        epoch += 1
        if seen == 0:
            raise ValueError("the loader yields no batches: dataset smaller than one batch per rank?")


def bench_data(prefix: str | os.PathLike[str], loader: str = "torch", threads: int = 2, batch_size: int = 128,
               seconds: float = 10.0, device_id: int | None = None, ceiling_images: int = 512) -> DataBenchResult:
    """Measure loader images/s and the decode ceiling in the same run (see the module docstring)."""
    reader = InsightFaceReader(prefix)
    jpegs = sample_jpegs(reader, ceiling_images)
    if loader == "torch":
        from data_pipeline.dataset import build_dataloader

        tl = build_dataloader(reader, batch_size, 0, 1, seed=0, workers=threads, persistent_workers=threads > 0)

        def torch_epoch(e: int) -> Iterable[Any]:
            tl.set_epoch(e)
            return tl

        images, wall = timed_iteration(torch_epoch, seconds)
        del tl
        ceiling = pil_ceiling(jpegs, threads, seconds)
        device = "cpu"
    elif loader == "dali":
        from data_pipeline.dali_iterator import DaliLoader

        dl = DaliLoader(reader, batch_size, 0, 1, seed=0, threads=threads, device_id=device_id)

        def dali_epoch(e: int) -> Iterable[Any]:
            dl.set_epoch(e)
            return dl

        sync = None
        if device_id is not None:
            import torch

            def sync(_: Any) -> None:
                torch.cuda.synchronize(device_id)

        images, wall = timed_iteration(dali_epoch, seconds, sync=sync)
        dl.close()
        ceiling = dali_ceiling(jpegs, threads, batch_size, seconds, device_id)
        device = "cpu" if device_id is None else f"cuda:{device_id}"
    else:
        raise ValueError(f"unknown loader {loader!r}: expected 'dali' or 'torch'")
    rate = images / wall
    return DataBenchResult(loader=loader, prefix=str(prefix), threads=threads, batch_size=batch_size,
                           seconds=wall, images=images, images_per_s=rate,
                           decode_ceiling_images_per_s=ceiling, ratio=rate / ceiling if ceiling else 0.0,
                           image_size=reader.image_size, device=device, cpu_count=os.cpu_count() or 1)
