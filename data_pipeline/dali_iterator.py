"""The DALI loader as a torch iterator with the same interface as the torch path's ``FaceLoader``.

``DaliLoader(prefix, batch_size, rank, world_size, seed, threads, device_id=None)`` yields
``(images, labels)``: images (B, 3, H, W) float32 in [-1, 1] (with ``uint8=True``: (B, H, W, 3)
uint8, flips applied), labels (B,) int64, on the CPU when device_id is None, else on
``cuda:device_id``. ``set_epoch(epoch, start_index)`` picks the epoch and
the resume position exactly like :class:`data_pipeline.dataset.ShardedSampler`: the samples of each
rank are the same as the torch path's (the same plan from (seed, epoch)), each chunk read in file
order (see :mod:`data_pipeline.dali_pipeline`). A new pipeline is built for each epoch (tens of
milliseconds) because DALI's reader takes its index only at build time.

``import nvidia.dali`` happens only when a loader is created.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.dali_pipeline import EpochIndex, build_pipeline, write_epoch_index
from data_pipeline.dataset import flip_probability, shard_plan
from data_pipeline.insightface import InsightFaceReader


def dali_available() -> bool:
    """Whether ``nvidia.dali`` can be imported (CPU pipelines need no GPU)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _to_torch(tl: Any, device: torch.device) -> torch.Tensor:
    """A DALI TensorList (uniform shape) -> a torch tensor on `device` (copied)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    shapes = tl.shape()
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"DALI batch has samples of different shapes ({shapes[0]} and others): every image "
                         "must have the size in the property file")
    dense = tl.as_tensor()   # no copy when the batch is already contiguous
    out = torch.empty((len(shapes), *shapes[0]), dtype=to_torch_type[dense.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(dense, out, cuda_stream=stream)
    return out


class DaliLoader:
    """Rank `rank`'s DALI loader over an insightface-layout dataset (see the module docstring)."""

    def __init__(self, prefix: str | os.PathLike[str] | InsightFaceReader, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, threads: int = 2, device_id: int | None = None, *,
                 shuffle: bool = True, flip: bool | float = True, drop_last_batch: bool = True,
                 pad_epoch: bool = True, chunk: int | None = None, chunks_per_rank: int = 256,
                 random_shuffle: bool = False, initial_fill: int = 1024, prefetch_queue_depth: int = 2,
                 index_dir: str | os.PathLike[str] | None = None, uint8: bool = False) -> None:
        if not dali_available():
            raise ImportError("the DALI loader needs NVIDIA DALI: pip install 'partialfc-discface[dali]' "
                              "(nvidia-dali-cuda130); CPU pipelines work without a GPU")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.reader = prefix if isinstance(prefix, InsightFaceReader) else InsightFaceReader(prefix)
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.threads = threads
        self.device_id = device_id
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self.shuffle, self.flip = shuffle, flip
        self.drop_last_batch, self.pad_epoch = drop_last_batch, pad_epoch
        n = len(self.reader)
        self.per_rank = -(-n // world_size) if pad_epoch else n // world_size
        # chunks of a few hundred per rank: batches span the whole file (see dali_pipeline)
        self.chunk = chunk if chunk is not None else max(batch_size, -(-self.per_rank // chunks_per_rank))
        self.random_shuffle, self.initial_fill = random_shuffle, initial_fill
        self.prefetch_queue_depth = prefetch_queue_depth
        self.uint8 = uint8  # hand over (B, H, W, 3) uint8 pixels; the consumer normalises on its device
        self._own_dir = index_dir is None
        self.index_dir = Path(tempfile.mkdtemp(prefix="pfc-dali-")) if index_dir is None else Path(index_dir)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        self.epoch = 0
        self.start_index = 0
        self.last_index: EpochIndex | None = None

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the epoch and the number of this rank's samples already consumed in it."""
        if not 0 <= start_index <= self.per_rank:
            raise ValueError(f"start_index {start_index} is outside this rank's epoch of {self.per_rank} "
                             "samples")
        self.epoch, self.start_index = epoch, start_index

    def _remaining(self) -> int:
        return self.per_rank - self.start_index

    def __len__(self) -> int:
        rem = self._remaining()
        return rem // self.batch_size if self.drop_last_batch else -(-rem // self.batch_size)

    def epoch_index(self) -> EpochIndex:
        """Write (and return) the index for the current epoch and start position."""
        if self.shuffle:
            plan = shard_plan(len(self.reader), self.world_size, self.seed, self.epoch, True, not self.pad_epoch)
            chunk = self.chunk
        else:
            # without shuffling one chunk per rank: each rank reads its block in file order
            plan = shard_plan(len(self.reader), self.world_size, self.seed, self.epoch, False, not self.pad_epoch)
            chunk = max(1, plan.shape[1])
        # the file name carries the rank: ranks sharing a folder never race on one file
        path = self.index_dir / f"epoch{self.epoch}_rank{self.rank}.idx"
        previous = self.last_index
        self.last_index = write_epoch_index(self.reader, plan, path, chunk, self.start_index)
        if previous is not None and previous.idx_path != path:
            # one index per epoch lists every image (~100 MB for MS1M): keep only the current one
            previous.idx_path.unlink(missing_ok=True)
        return self.last_index

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        steps = len(self)
        if steps == 0:
            return
        index = self.epoch_index()
        # the pipeline seed drives the flips: one stream per (seed, epoch, rank, start)
        pipe_seed = int(np.random.SeedSequence([self.seed, self.epoch, self.rank, self.start_index])
                        .generate_state(1)[0] & 0x7FFFFFFF)
        pipe = build_pipeline(index.rec_paths, index.idx_path, shard_id=self.rank, num_shards=self.world_size,
                              batch_size=self.batch_size, num_threads=self.threads, device_id=self.device_id,
                              seed=pipe_seed, flip_prob=flip_probability(self.flip),
                              random_shuffle=self.random_shuffle, initial_fill=self.initial_fill,
                              prefetch_queue_depth=self.prefetch_queue_depth, uint8=self.uint8)
        try:
            rem = self._remaining()
            for step in range(steps):
                images, labels = pipe.run()
                x = _to_torch(images, self.device)
                y = _to_torch(labels, self.device).reshape(-1)
                take = min(self.batch_size, rem - step * self.batch_size)
                if take < self.batch_size:   # last partial batch: DALI wrapped around, cut it
                    x, y = x[:take], y[:take]
                yield x, y
        finally:
            del pipe

    def close(self) -> None:
        """Remove the index files this loader wrote (when it made its own folder)."""
        if self._own_dir:
            shutil.rmtree(self.index_dir, ignore_errors=True)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
