"""What a torch DataLoader worker hands to the training process: the :class:`Batch`, and the shared
buffers a worker reuses for it.

A worker (a process) decodes a batch straight into shared memory and sends it through the
DataLoader's queue; torch pickles the tensor as a file descriptor, so the pixels are written once
and never copied. A fresh segment per batch pays its first-touch page faults every time (about
0.04 ms per 112x112 image on the 2-core box, a fifth of the decode), so each worker keeps a small
ring of segments (:class:`BatchRing`) and writes the next batch into one the training process no
longer holds.

"No longer holds" is exact, not a convention about when a consumer is done: the training process
takes a lease on each ring batch as it arrives (a weak reference to the batch's storage, which every
tensor, view, numpy array or storage object made from the batch keeps alive) and frees the slot, one
byte in a small shared array of the worker's, only once that storage is gone. A worker that finds no
free slot writes into a fresh segment as before: a consumer that keeps its batches (``list(loader)``)
costs memory, never correctness, and no process ever waits for another.

Labels and flips cross as numpy arrays inside the pickle (a few hundred bytes), not as tensors: a
tensor sent by a worker gets a shared-memory segment and a descriptor hand-over of its own.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["Batch", "BatchRing", "CorruptRecord", "collate", "held_leases", "shared_uint8", "worker_buffer"]


@dataclass
class CorruptRecord:
    key: int
    message: str


@dataclass(frozen=True)
class Slot:
    """Slot ``index`` of a worker's ring, whose busy flag is ``flags[index]`` (the worker's shared array)."""

    flags: torch.Tensor
    index: int


@dataclass
class Batch:
    """A worker's batch: pixels (B, H, W, 3) uint8 RGB, labels (B,) int64, the corrupt records it
    skipped, and ``flips`` (B,) bool still to mirror (None when the worker mirrored them itself).
    ``slot``: the ring slot holding the pixels (worker side; None for a fresh segment)."""

    pixels: torch.Tensor
    labels: torch.Tensor
    skipped: list[CorruptRecord]
    flips: torch.Tensor | None = None
    slot: Slot | None = field(default=None, repr=False)

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True): a pinned copy; the shared batch, and its slot, are released."""
        flips = None if self.flips is None else self.flips.pin_memory()
        return Batch(self.pixels.pin_memory(), self.labels.pin_memory(), self.skipped, flips)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        flips = None if self.flips is None else self.flips.numpy()
        return _rebuild_batch, (self.pixels, self.labels.numpy(), flips, self.skipped, self.slot)


def _rebuild_batch(pixels: torch.Tensor, labels: np.ndarray, flips: np.ndarray | None,
                   skipped: list[CorruptRecord], slot: Slot | None) -> Batch:
    """Unpickling in the training process: the batch, with a lease on its ring slot."""
    if slot is not None:
        _LEASES.take(pixels, slot)
    return Batch(pixels, torch.from_numpy(labels), skipped, None if flips is None else torch.from_numpy(flips))


class _Leases:
    """The training process's leases on ring batches: (weak reference to the batch's storage, slot).

    Checked on every arrival; an expired one frees its slot. Arrivals come from the DataLoader's
    pin-memory thread or the main thread, hence the lock. ``StorageWeakRef`` (torch.multiprocessing's
    own weak reference to a storage, the one its sharing cache uses) expires exactly when the last
    holder of the storage is gone: tests/data_pipeline/test_worker_batches.py pins that.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: list[tuple[StorageWeakRef, np.ndarray, int]] = []

    def take(self, pixels: torch.Tensor, slot: Slot) -> None:
        with self._lock:
            self._release_expired()
            self._held.append((StorageWeakRef(pixels.untyped_storage()), slot.flags.numpy(), slot.index))

    def _release_expired(self) -> None:
        keep = []
        for ref, flags, index in self._held:
            if ref.expired():
                flags[index] = 0  # after the storage is gone (unmapped here): the worker may write again
            else:
                keep.append((ref, flags, index))
        self._held = keep

    def __len__(self) -> int:
        with self._lock:
            self._release_expired()
            return len(self._held)


_LEASES = _Leases()


def held_leases() -> int:
    """How many ring batches this process still holds (for tests and diagnostics)."""
    return len(_LEASES)


class BatchRing:
    """One worker process's reusable batch buffers: at most ``slots`` segments, each busy from the
    moment the worker takes it until the training process has let go of the batch written into it."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.flags = shared_uint8((max(slots, 1),))
        self.flags.zero_()
        self._busy = self.flags.numpy()
        self.buffers: list[torch.Tensor] = []

    def take(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, Slot | None]:
        """A (shape) uint8 buffer in shared memory and its slot; a fresh segment (slot None) when
        every slot is busy or holds another image size."""
        for k, buf in enumerate(self.buffers):
            if self._busy[k] == 0 and buf.shape[1:] == shape[1:] and buf.shape[0] >= shape[0]:
                self._busy[k] = 1
                return buf[: shape[0]], Slot(self.flags, k)
        if len(self.buffers) < self.slots:
            self.buffers.append(shared_uint8(shape))
            k = len(self.buffers) - 1
            self._busy[k] = 1
            return self.buffers[k], Slot(self.flags, k)
        return shared_uint8(shape), None


_RING: tuple[int, BatchRing] | None = None


def worker_buffer(shape: tuple[int, ...], slots: int) -> tuple[torch.Tensor, Slot | None]:
    """In a DataLoader worker: a shared buffer for the next batch from this process's ring (made on
    first use; keyed by pid, so a ring inherited through fork is never shared with the parent)."""
    global _RING
    if slots <= 0:
        return shared_uint8(shape), None
    if _RING is None or _RING[0] != os.getpid():
        _RING = (os.getpid(), BatchRing(slots))
    return _RING[1].take(shape)


def shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor in shared memory (what a DataLoader worker sends without a copy).

    ``torch.empty(...).share_memory_()`` allocates private memory and then copies it into a new
    shared segment, touching every page twice: 8-11 ms for a 128 x 112 x 112 x 3 batch on the 2-core
    box, a third of the batch's decode. ``UntypedStorage._new_shared`` (private; its behaviour is
    pinned by tests/data_pipeline/test_uint8_handover.py) creates the segment directly: about half that.
    """
    n = 1
    for d in shape:
        n *= int(d)
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is None:  # a torch without it: the public, slower way
        return torch.empty(shape, dtype=torch.uint8).share_memory_()
    return torch.empty(0, dtype=torch.uint8).set_(new_shared(n)).view(shape)


def collate(data: Any) -> Batch:
    """collate_fn for FaceDataset: its batched fetch (``__getitems__``) already built the batch."""
    if not isinstance(data, Batch):
        raise TypeError(f"expected FaceDataset.__getitems__'s Batch, got {type(data).__name__}")
    return data
