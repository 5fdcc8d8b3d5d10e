"""The DALI loader as a torch iterator with the same interface as the torch path's ``FaceLoader``.

``DaliLoader(prefix, batch_size, rank, world_size, seed, threads, device_id=None)`` yields
``(images, labels)``: images (B, 3, H, W) float32 in [-1, 1], labels (B,) int64, on the CPU when
device_id is None, else on ``cuda:device_id``. With ``uint8=True`` it yields ``(pixels, labels,
flips)``: pixels (B, H, W, 3) uint8 as decoded, flips (B,) bool (None with ``flip=False``), the
images the consumer mirrors when it normalises them on its device
(``launcher.trainer.batches.to_model_input``). ``set_epoch(epoch, start_index)`` picks the epoch and
the resume position exactly like :class:`data_pipeline.dataset.ShardedSampler`: the samples of each
rank are the same as the torch path's (the same plan from (seed, epoch)), each chunk read in file
order (see :mod:`data_pipeline.dali_pipeline`). The flips are the epoch plan's too, by position in
the rank's reading order (fed to DALI per batch), so a run resumed mid-epoch flips exactly what the
uninterrupted one did. A new pipeline is built for each epoch (tens of
milliseconds for small files) because DALI's reader takes its index only at build time. Each rank
writes the index of its own block only (O(N/W)), in *segments* of at most ``segment`` samples (a
multiple of the batch size; default about 2M): one pipeline per segment, so DALI's build, which
parses its index while holding the GIL (about 1 s per million entries on the 2-core CPU box), never
pauses training for a whole epoch's index at once. While a segment runs, the next segment's index
(or the next epoch's first) is written by a background thread.

``import nvidia.dali`` happens only when a loader is created.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.dali_pipeline import EpochIndex, build_pipeline, write_rank_index
from data_pipeline.epoch_plan import flip_probability, rank_block, rank_flips
from data_pipeline.insightface import InsightFaceReader
from data_pipeline.recordio import RecordIOError


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
                 index_dir: str | os.PathLike[str] | None = None, prefetch_index: bool = True,
                 segment: int | None = None, segment_samples: int = 1 << 21, uint8: bool = False) -> None:
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
        if segment is not None and (segment < batch_size or segment % batch_size):
            raise ValueError(f"segment={segment} must be a positive multiple of batch_size={batch_size} (every "
                             "segment but the last ends on a whole batch)")
        self.segment = segment if segment is not None else max(batch_size, segment_samples // batch_size * batch_size)
        self.prefetch_queue_depth = prefetch_queue_depth
        self.uint8 = uint8  # yield (pixels uint8, labels, flips): the consumer normalises and mirrors
        self._own_dir = index_dir is None
        self.index_dir = Path(tempfile.mkdtemp(prefix="pfc-dali-")) if index_dir is None else Path(index_dir)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        self.epoch = 0
        self.start_index = 0
        self.last_index: EpochIndex | None = None
        self.prefetch_index = prefetch_index
        self._pool: ThreadPoolExecutor | None = None
        self._next: tuple[tuple[int, int, int], Future[EpochIndex]] | None = None

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

    def _segments(self) -> list[tuple[int, int]]:
        """This epoch's remaining reading order cut into segments [a, b), from ``start_index``."""
        return [(a, min(a + self.segment, self.per_rank)) for a in range(self.start_index, self.per_rank, self.segment)]

    def _write_index(self, epoch: int, start: int, stop: int) -> EpochIndex:
        """This rank's index for items start:stop of its reading order in `epoch`, streamed to disk."""
        n = len(self.reader)
        block = rank_block(n, self.world_size, self.rank, self.seed, epoch, self.shuffle, not self.pad_epoch)
        # without shuffling one chunk: the rank reads its block in file order
        chunk = self.chunk if self.shuffle else max(1, len(block))
        # the file name carries the rank: ranks sharing a folder never race on one file
        path = self.index_dir / f"epoch{epoch}_rank{self.rank}_{start}-{stop}.idx"
        return write_rank_index(self.reader, block, path, chunk, start, stop, rank=self.rank, epoch=epoch)

    def segment_index(self, start: int, stop: int) -> EpochIndex:
        """The index of segment [start, stop) of the current epoch (from the background writer when it
        prepared exactly this one)."""
        index: EpochIndex | None = None
        if self._next is not None:
            key, fut = self._next
            self._next = None
            if key == (self.epoch, start, stop):
                index = fut.result()
            else:
                with contextlib.suppress(Exception):
                    fut.result().idx_path.unlink(missing_ok=True)
        if index is None:
            index = self._write_index(self.epoch, start, stop)
        previous = self.last_index
        self.last_index = index
        if previous is not None and previous.idx_path != index.idx_path:
            # keep only the current index (and the next one being prepared)
            previous.idx_path.unlink(missing_ok=True)
        return index

    def epoch_index(self) -> EpochIndex:
        """The index of the current epoch's first remaining segment (all of it for files below
        ``segment`` samples per rank)."""
        segments = self._segments()
        a, b = segments[0] if segments else (self.start_index, self.start_index)
        return self.segment_index(a, b)

    def prepare(self, epoch: int, start: int, stop: int) -> None:
        """Start writing the index of segment [start, stop) of `epoch` in the background."""
        if not self.prefetch_index or self._next is not None:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pfc-dali-index")
        self._next = ((epoch, start, stop), self._pool.submit(self._write_index, epoch, start, stop))

    def _build(self, index: EpochIndex, start: int) -> Any:
        # the pipeline seed drives only DALI's own shuffle buffer (random_shuffle, off by default)
        pipe_seed = int(np.random.SeedSequence([self.seed, self.epoch, self.rank, start])
                        .generate_state(1)[0] & 0x7FFFFFFF)
        # the index holds this rank's block only: DALI reads it as its single shard
        return build_pipeline(index.rec_paths, index.idx_path, shard_id=0, num_shards=1,
                              batch_size=self.batch_size, num_threads=self.threads, device_id=self.device_id,
                              seed=pipe_seed, random_shuffle=self.random_shuffle, initial_fill=self.initial_fill,
                              prefetch_queue_depth=self.prefetch_queue_depth, uint8=self.uint8,
                              flips=self._plan_flips(start))

    def _plan_flips(self, start: int) -> Callable[[], np.ndarray] | None:
        """The epoch plan's flips for the batches read from position ``start`` of this rank's part on,
        one batch per call (the torch path's draws: a function of the epoch and the position, so that
        a run resumed mid-epoch, whose pipeline starts there, flips what the uninterrupted run did)."""
        p = flip_probability(self.flip)
        if p <= 0.0:
            return None
        pos, epoch = start, self.epoch

        def next_batch() -> np.ndarray:
            nonlocal pos
            out = rank_flips(self.per_rank, self.world_size, self.rank, self.seed, epoch, p, pos, self.batch_size)
            pos += self.batch_size
            return out

        return next_batch

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        steps = len(self)
        if steps == 0:
            return
        segments = self._segments()
        done = 0
        for j, (a, b) in enumerate(segments):
            if done >= steps:
                break
            index = self.segment_index(a, b)
            pipe = self._build(index, a)
            if j + 1 < len(segments):
                self.prepare(self.epoch, *segments[j + 1])
            else:  # the next epoch's first segment
                self.prepare(self.epoch + 1, 0, min(self.segment, self.per_rank))
            last = j + 1 == len(segments)
            n_items = b - a
            seg_steps = steps - done if last else n_items // self.batch_size
            try:
                for k in range(seg_steps):
                    dali_said: str | None = None
                    try:
                        outs = pipe.run()
                    except RuntimeError as e:  # DALI's own: its operator's error and a C++ context
                        dali_said = str(e)
                    if dali_said is not None:
                        # Outside the except block, keeping only DALI's message: an error raised while DALI's
                        # is handled (the Python reader's RecordIOError) would keep it as its __context__, and
                        # DALI's error holds its pipeline in a reference cycle (its traceback's frames, one kept
                        # in a closure cell). That cycle is collected now, in this process, where DALI's threads
                        # are: left to a later collection, it may be collected in a forked process (a
                        # DataLoader worker), where DALI's shutdown deadlocks.
                        pipe = None
                        gc.collect()
                        raise self._read_error(dali_said, index, k)
                    x = _to_torch(outs[0], self.device)
                    y = _to_torch(outs[1], self.device).reshape(-1)
                    f = _to_torch(outs[2], self.device).reshape(-1).bool() if len(outs) > 2 else None
                    take = min(self.batch_size, n_items - k * self.batch_size)
                    if take < self.batch_size:   # last partial batch: DALI wrapped around, cut it
                        x, y = x[:take], y[:take]
                        f = None if f is None else f[:take]
                    if self.uint8:
                        yield x, y, f
                    else:
                        yield x, y
            finally:
                pipe = None
            done += seg_steps

    def _read_error(self, dali_said: str, index: EpochIndex, k: int) -> RecordIOError:
        """What stopped DALI in batch ``k`` of a segment (``dali_said``: its error's message), said as the torch
        path says it: the first record of the batches DALI may have been reading (it runs
        ``prefetch_queue_depth`` batches ahead) that the Python reader cannot read or decode, whose
        :class:`RecordIOError` names file, key and byte offset; failing that, DALI's own line about the file."""
        from data_pipeline.dataset import FaceDataset

        order = index.order.get(self.rank, np.empty(0, dtype=np.int64))
        lo = k * self.batch_size
        ds = FaceDataset(self.reader)
        for i in order[lo: lo + (1 + self.prefetch_queue_depth) * self.batch_size]:
            try:
                ds.decode(int(i))
            except RecordIOError as bad:
                return bad
        lines = [x.strip() for x in dali_said.splitlines() if x.strip()]
        said = next((lines[j + 1] for j, x in enumerate(lines[:-1]) if x == "encountered:"),
                    lines[0] if lines else "no message")
        return RecordIOError(f"DALI stopped reading ({said}); `pfc data inspect` checks every record, and "
                             "data.loader=torch with data.skip_corrupt=true skips corrupt ones",
                             path=self.reader.rec_path)

    def close(self) -> None:
        """Stop the background index writer; remove the index files this loader wrote (when it made
        its own folder)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._next is not None:
            with contextlib.suppress(Exception):
                self._next[1].result().idx_path.unlink(missing_ok=True)
            self._next = None
        if self._own_dir:
            shutil.rmtree(self.index_dir, ignore_errors=True)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
