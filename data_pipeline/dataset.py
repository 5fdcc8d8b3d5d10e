"""The torch path: a Dataset over an insightface-layout record file, and its DataLoader.

Each rank builds its own loader over the same files; the :class:`~data_pipeline.epoch_plan.ShardedSampler`
gives it its block of each epoch as ``(index, flip)`` items (the epoch plan, shared with the DALI path,
is :mod:`data_pipeline.epoch_plan`, re-exported here). Workers decode JPEGs to uint8 (H, W, 3) in a
shared-memory batch (B, H, W, 3) (:mod:`data_pipeline.worker_batches`: the batch and the buffers a
worker reuses); the training step converts it to float32 in [-1, 1] on its device (:func:`to_unit`
is the same formula on the host).
"""

from __future__ import annotations

import atexit
import io
import logging
import multiprocessing
import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, get_worker_info

from data_pipeline.epoch_plan import (
    Item,
    ShardedSampler,
    epoch_flips,
    epoch_order,
    flip_probability,
    permute,
    plan_length,
    rank_block,
    shard_plan,
)
from data_pipeline.insightface import InsightFaceReader
from data_pipeline.recordio import RecordIOError
from data_pipeline.worker_batches import (
    Batch,
    CorruptRecord,
    Slot,
    collate,
    release_exited_rings,
    shared_uint8,
    worker_buffer,
)

# The epoch plan is part of this module's interface since the torch path was one module.
__all__ = ["Batch", "FaceDataset", "FaceLoader", "ShardedSampler", "build_dataloader", "collate", "decode_rgb",
           "default_prefix", "epoch_flips", "epoch_order", "flip_probability", "permute", "plan_length", "rank_block",
           "shard_plan", "shared_uint8", "to_unit"]

log = logging.getLogger(__name__)

# SeedSequence stream word of the loader's worker seeds (epoch_plan draws the order with 0, the flips with 1).
_WORKER_SEED_STREAM = 2


def decode_rgb(payload: bytes, flip: bool = False) -> np.ndarray:
    """The torch path's decoder: JPEG bytes -> (H, W, 3) uint8 RGB, mirrored left-right if ``flip``
    (also what the decode ceiling of ``pfc bench data`` times). Pillow's errors propagate."""
    with Image.open(io.BytesIO(payload)) as im:
        rgb = im if im.mode == "RGB" else im.convert("RGB")
        # PIL's mirror costs ~0.01 ms at 112x112; numpy's arr[:, ::-1] copy, whose innermost
        # run is one 3-byte pixel, ~0.07 ms: a third of the decode (2-core CPU box).
        return np.asarray(rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else rgb)


class FaceDataset(Dataset[tuple[torch.Tensor, int]]):
    """Images and class ids of an insightface-layout dataset.

    ``ds[i]`` or ``ds[(i, flip)]`` -> (image float32 (3, H, W) in [-1, 1], class id) for the i-th image
    record (``reader.image_keys[i]``). H, W come from the property file; an image of another size is
    an error. A record that cannot be read or decoded raises :class:`RecordIOError` naming file,
    key and byte offset; with ``skip_corrupt=True`` it is logged and returns ``None`` instead (the
    loader drops it from the batch and counts it).

    The record file is opened lazily in each process (the reader reopens its descriptor after a
    fork or unpickling), so one dataset object serves every DataLoader worker.

    Batched fetches (``__getitems__``, what the DataLoader calls) mirror the flipped images themselves
    with ``mirror=True``; with False they leave the mirroring to the consumer and report the flips.
    ``ring_slots``: how many batch buffers each worker process reuses (0: a fresh segment per batch).
    """

    def __init__(self, prefix: str | os.PathLike[str] | InsightFaceReader, skip_corrupt: bool = False,
                 mirror: bool = True, ring_slots: int = 0) -> None:
        self.reader = prefix if isinstance(prefix, InsightFaceReader) else InsightFaceReader(prefix)
        # int64 view of the index: forked workers share its pages (a list would be copied page by page)
        self.keys = self.reader.image_key_array
        self.image_size = self.reader.image_size
        self.num_classes = self.reader.num_classes
        self.skip_corrupt = skip_corrupt
        self.mirror = mirror
        self.ring_slots = ring_slots

    def __len__(self) -> int:
        return len(self.keys)

    def decode(self, i: int, flip: bool = False) -> tuple[np.ndarray, int]:
        """Read and decode image i: ((H, W, 3) uint8 RGB, mirrored left-right if ``flip``, class id);
        errors name file, key, offset."""
        key = self.keys[i]
        cid, payload = self.reader.read_image(key)
        return self._pixels(key, payload, flip), cid

    def _pixels(self, key: int, payload: bytes, flip: bool) -> np.ndarray:
        try:
            arr = decode_rgb(payload, flip)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise RecordIOError(f"payload of {len(payload)} bytes is not a decodable image ({exc})",
                                path=self.reader.rec_path, key=key, offset=self.reader.offset(key)) from None
        if arr.shape[:2] != self.image_size:
            raise RecordIOError(f"image is {arr.shape[0]}x{arr.shape[1]}, the property file says "
                                f"{self.image_size[0]}x{self.image_size[1]}", path=self.reader.rec_path,
                                key=key, offset=self.reader.offset(key))
        return arr

    def _decode_or_skip(self, i: int, flip: bool = False,
                        plain: tuple[int, bytes] | None = None) -> tuple[np.ndarray, int] | CorruptRecord:
        """:meth:`decode`, or from the record's ``plain`` read (class id, payload) when the batch had one."""
        try:
            if plain is None:
                return self.decode(i, flip)
            return self._pixels(self.keys[i], plain[1], flip), plain[0]
        except RecordIOError as exc:
            if not self.skip_corrupt:
                raise
            log.warning("skipping corrupt record: %s", exc)
            return CorruptRecord(key=self.keys[i], message=str(exc))

    @staticmethod
    def _split(item: Item) -> tuple[int, bool]:
        if isinstance(item, tuple):
            return int(item[0]), bool(item[1])
        return int(item), False

    def __getitem__(self, item: Item) -> tuple[torch.Tensor, int]:
        i, flip = self._split(item)
        got = self._decode_or_skip(i, flip)
        if isinstance(got, CorruptRecord):
            return None  # type: ignore[return-value]  # documented: skipped records read as None
        arr, cid = got
        return to_unit(torch.from_numpy(np.array(arr))[None])[0], cid

    def __getitems__(self, items: Sequence[Item]) -> Batch:
        """Batched fetch (used by DataLoader): the decoded uint8 pixels of the whole batch, mirrored
        here (``mirror``) or with the flips left to the consumer.

        The float conversion is left to the consumer (:func:`to_unit`, or the training step): handing
        over uint8 moves a quarter of the bytes between processes, and shared-memory page faults on a
        float batch cost about as much as decoding it (measured on the 2-core CPU box).

        In a worker, a :class:`RecordIOError` (a corrupt record, without ``skip_corrupt``) comes back as a
        batch that carries it (``Batch.error``), which :class:`FaceLoader` raises again: raised here, torch
        would hand the training process a copy without file, key and offset, worded as a traceback.
        """
        h, w = self.image_size
        shape = (len(items), h, w, 3)
        # In a worker: written once, in shared memory (a buffer of the worker's ring), and not copied
        # again when sent on.
        if get_worker_info() is None:
            return self._fetch(items, torch.empty(shape, dtype=torch.uint8), None)
        pixels, slot = worker_buffer(shape, self.ring_slots)
        try:
            return self._fetch(items, pixels, slot)
        except RecordIOError as exc:
            if slot is not None:
                slot.release()
            return Batch.failed(exc, (h, w, 3))

    def _fetch(self, items: Sequence[Item], pixels: torch.Tensor, slot: Slot | None) -> Batch:
        """:meth:`__getitems__` into ``pixels`` (len(items), H, W, 3), the buffer of ring slot ``slot``."""
        buf = pixels.numpy()
        labels: list[int] = []
        flips: list[bool] = []
        skipped: list[CorruptRecord] = []
        n = 0
        split = [self._split(item) for item in items]
        # one batched read of the plain records; any other is read (or explained) one by one
        plain = self.reader.read_plain_images(self.keys[np.fromiter((i for i, _ in split), np.int64, len(split))])
        for (i, flip), record in zip(split, plain, strict=True):
            got = self._decode_or_skip(i, flip and self.mirror, record)
            if isinstance(got, CorruptRecord):
                skipped.append(got)
                continue
            arr, cid = got
            buf[n] = arr
            labels.append(cid)
            flips.append(flip)
            n += 1
        left = None if self.mirror else torch.tensor(flips, dtype=torch.bool)
        return Batch(pixels[:n], torch.tensor(labels, dtype=torch.int64), skipped, left, slot)


def to_unit(pixels: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1] (x / 127.5 - 1), on `device` (default:
    where `pixels` are). Moving uint8 first makes the host-to-device copy 4x smaller."""
    if device is not None:
        pixels = pixels.to(device, non_blocking=True)
    if pixels.device.type != "cpu":
        return pixels.permute(0, 3, 1, 2).contiguous().float().div_(127.5).sub_(1.0)
    # On the CPU, numpy: transposing the uint8 first and then converting contiguous memory is ~2x
    # cheaper than a strided cast, and numpy stays on this thread, where torch's intra-op pool would
    # compete with the DataLoader workers for the same cores.
    chw = np.ascontiguousarray(pixels.numpy().transpose(0, 3, 1, 2))
    out = chw.astype(np.float32)
    out /= np.float32(127.5)
    out -= np.float32(1.0)
    return torch.from_numpy(out)


class FaceLoader:
    """A DataLoader over one rank's shard that yields ``(images, labels)``.

    images (B, 3, H, W) float32 in [-1, 1], labels (B,) int64 global class ids, where B is the batch
    size (smaller only for skipped corrupt records, or a last partial batch without ``drop_last``).
    With ``uint8=True`` it yields ``(pixels, labels, flips)`` as the DALI loader does: the workers'
    pixels as they are, (B, H, W, 3) uint8 RGB (pinned when the DataLoader pins), and flips (B,) bool,
    the images still to mirror left-right (None when the sampler flips none): the trainer mirrors and
    converts them on its device (``launcher.trainer.batches.to_model_input``), a quarter of the bytes
    to move and no pass over the pixels on the host. ``skipped`` counts the corrupt records skipped so
    far (``skip_corrupt=True``), ``skipped_records`` lists them.

    The DataLoader draws its workers' base seed from a generator of its own (``loader.generator``), seeded
    anew for each iterator from the sampler's (seed, rank, epoch): without one, every ``iter()`` draws it
    from the global torch RNG, and a run resumed mid-epoch (a new iterator the uninterrupted run never
    made, after the checkpoint's RNG state is restored) would shift everything drawn from it after, such
    as dropout masks. The data itself draws nothing in the workers (order and flips come from the sampler).
    """

    def __init__(self, dataset: FaceDataset, sampler: ShardedSampler, loader: DataLoader[Any],
                 device: torch.device | str | None = None, uint8: bool = False) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.loader = loader
        self.device = device
        self.uint8 = uint8
        self.skipped_records: list[CorruptRecord] = []

    @property
    def skipped(self) -> int:
        return len(self.skipped_records)

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the epoch and resume position (samples of this rank already consumed)."""
        self.sampler.set_epoch(epoch, start_index)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, ...]]:
        # the last epoch's workers (not persistent) are gone: unmap their rings before new workers make theirs
        release_exited_rings()
        return self._batches()

    def _batches(self) -> Iterator[tuple[torch.Tensor | None, ...]]:
        if self.loader.generator is not None:
            self.loader.generator.manual_seed(worker_base_seed(self.sampler.seed, self.sampler.rank,
                                                               self.sampler.epoch))
        for batch in self.loader:
            if batch.error is not None:  # a corrupt record in a worker: raised as it was raised there
                raise batch.error.error()
            if batch.skipped:
                self.skipped_records.extend(batch.skipped)
            labels = batch.labels if self.device is None else batch.labels.to(self.device, non_blocking=True)
            if self.uint8:
                pixels = batch.pixels if self.device is None else batch.pixels.to(self.device, non_blocking=True)
                flips = batch.flips if self.sampler.flip_prob > 0 else None
                yield pixels, labels, flips
            else:
                pixels = batch.pixels
                if batch.flips is not None:  # a dataset that left the mirror to us: same pixels as PIL's
                    pixels = torch.where(batch.flips.view(-1, 1, 1, 1), pixels.flip(2), pixels)
                yield to_unit(pixels, self.device), labels


def worker_base_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of the DataLoader generator that draws rank ``rank``'s worker seeds for epoch ``epoch``."""
    state = np.random.SeedSequence([seed, rank, epoch, _WORKER_SEED_STREAM]).generate_state(1, dtype=np.uint64)
    return int(state[0])


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker init: ignore SIGTERM/SIGINT/SIGUSR1/SIGUSR2. A scheduler's stop signal often
    reaches every process of a job (torchrun signals process groups, SLURM a whole step); the main
    process then saves a checkpoint and shuts its workers down itself, which a worker dead of the signal
    would turn into a "DataLoader worker killed" error."""
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, signal.SIG_IGN)


def _kill_leftover_workers() -> None:
    """At exit of the process that made the loaders: SIGKILL the daemonic worker processes still alive.

    Workers ignore SIGTERM (see :func:`ignore_stop_signals`), and multiprocessing's own exit handler stops
    daemonic children with SIGTERM and then joins them: a process that leaves with its loader still open
    (an exception in the training loop keeps the iterator referenced) would wait for them forever.
    Registered after multiprocessing's handler, so (atexit is last-in, first-out) it runs before it."""
    leftover = [p for p in multiprocessing.active_children() if p.daemon and p.is_alive()]
    if leftover:
        # torch's SIGCHLD handler would report each killed worker as a failure: we are leaving anyway
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for proc in leftover:
        proc.kill()


_KILL_AT_EXIT_REGISTERED = False


def build_dataloader(prefix: str | os.PathLike[str] | InsightFaceReader, batch_size: int, rank: int = 0,
                     world_size: int = 1, seed: int = 0, workers: int = 2, *, shuffle: bool = True,
                     flip: bool | float = True, drop_last_batch: bool = True, pad_epoch: bool = True,
                     skip_corrupt: bool = False, pin_memory: bool = False, prefetch_factor: int = 4,
                     persistent_workers: bool = False, device: torch.device | str | None = None,
                     uint8: bool = False) -> FaceLoader:
    """The torch loader of rank `rank` of `world_size`.

    ``pad_epoch`` True pads each epoch by wrapping around so all ranks get ceil(N/W) samples; False
    drops the tail so they get floor(N/W). ``drop_last_batch`` drops a last partial batch (equal
    step counts on every rank either way, since the parts have equal length). Call
    ``loader.set_epoch(epoch, start_index)`` before each epoch (and with the consumed position to
    resume mid-epoch). ``uint8``: hand batches over as (B, H, W, 3) uint8 (see :class:`FaceLoader`).
    ``flip``: True flips half the images (drawn by the sampler), False none, a number is the probability.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # uint8: the step mirrors on its device (a GPU does it for free); the float path mirrors in PIL.
    # Ring: a worker's batches in flight (prefetch_factor), the one the consumer holds, and one whose
    # release is seen only at the next arrival; a consumer that keeps more gets fresh segments.
    dataset = FaceDataset(prefix, skip_corrupt=skip_corrupt, mirror=not uint8,
                          ring_slots=prefetch_factor + 2 if workers > 0 else 0)
    sampler = ShardedSampler(len(dataset), rank, world_size, seed, shuffle=shuffle, drop_last=not pad_epoch,
                             flip_prob=flip_probability(flip))
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, persistent_workers=persistent_workers)
        global _KILL_AT_EXIT_REGISTERED
        if not _KILL_AT_EXIT_REGISTERED:
            atexit.register(_kill_leftover_workers)
            _KILL_AT_EXIT_REGISTERED = True
    # a generator of its own (FaceLoader seeds it): an iterator draws nothing from the global torch RNG
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=collate, drop_last=drop_last_batch, pin_memory=pin_memory,
                        worker_init_fn=ignore_stop_signals, generator=torch.Generator(), **kwargs)
    return FaceLoader(dataset, sampler, loader, device, uint8=uint8)


def default_prefix(path: str | os.PathLike[str]) -> Path:
    """Accept ``DIR`` (meaning ``DIR/train``), ``PREFIX`` or ``PREFIX.rec``; return the prefix."""
    p = Path(path)
    if p.is_dir():
        return p / "train"
    if p.suffix in (".rec", ".idx"):
        return Path(str(p)[: -len(p.suffix)])
    return p
