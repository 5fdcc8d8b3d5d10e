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

Nor is a ring batch's segment handed over again with every batch. A tensor sent by a worker travels as
a file descriptor, passed over a socket to the training process, which maps the segment again and
unmaps it when the batch is dropped: about 0.4 ms of CPU time on each side per tensor, and the training
process's first reads of the remapped pages fault once per 4 KiB page (about 1 ms per 128 x 112 x 112
batch). So the training process keeps each ring segment mapped once it has it (:class:`_KnownRings`),
marks it known in the worker's shared array, and from then on a ring batch is sent as (ring, slot,
shape): the consumer gets a tensor over the kept mapping with a storage of its own
(``torch.frombuffer``), which is what its lease watches. Until the training process has marked a
segment known the worker keeps sending it, so no message has to arrive for the protocol to stay right.

Labels and flips cross as numpy arrays inside the pickle (a few hundred bytes), not as tensors: a
tensor sent by a worker gets a shared-memory segment and a descriptor hand-over of its own.

A corrupt record that stops the run travels the same way: the worker puts the error's fields in the
batch (:class:`WorkerError`) and the training process raises the error again, file, key and offset
included. Raised in the worker, torch would re-raise it as ``RecordIOError(formatted traceback)``, with
no file, key or offset and the worker's traceback for a message.
"""

from __future__ import annotations

import os
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from data_pipeline.record_format import RecordIOError

__all__ = ["Batch", "BatchRing", "CorruptRecord", "WorkerError", "collate", "held_leases", "release_exited_rings",
           "ring_stats", "shared_uint8", "worker_buffer"]


@dataclass
class CorruptRecord:
    key: int
    message: str


@dataclass(frozen=True)
class WorkerError:
    """A :class:`~data_pipeline.record_format.RecordIOError` raised in a worker, as its fields: what the
    training process needs to raise it again (:meth:`error`) with its file, key and offset. Torch would
    send the error itself as its class and formatted traceback, and the class's keyword-only fields
    would be lost."""

    kind: type[RecordIOError]
    reason: str
    path: str | None
    key: int | None
    offset: int | None

    @classmethod
    def of(cls, exc: RecordIOError) -> WorkerError:
        return cls(type(exc), exc.reason, exc.path, None if exc.key is None else int(exc.key),
                   None if exc.offset is None else int(exc.offset))

    def error(self) -> RecordIOError:
        return self.kind(self.reason, path=self.path, key=self.key, offset=self.offset)


@dataclass(frozen=True)
class Slot:
    """Slot ``index`` of the worker's ring ``ring`` (worker side)."""

    ring: BatchRing
    index: int

    def release(self) -> None:
        """Free the slot again (worker side), for a batch that is not sent after all."""
        self.ring.release(self.index)


@dataclass
class Batch:
    """A worker's batch: pixels (B, H, W, 3) uint8 RGB, labels (B,) int64, the corrupt records it
    skipped, and ``flips`` (B,) bool still to mirror (None when the worker mirrored them itself).
    ``slot``: the ring slot holding the pixels (worker side; None for a fresh segment). ``error``: the
    corrupt record that stopped the worker's batch (the batch is then empty): the consumer raises it
    (:meth:`WorkerError.error`)."""

    pixels: torch.Tensor
    labels: torch.Tensor
    skipped: list[CorruptRecord]
    flips: torch.Tensor | None = None
    slot: Slot | None = field(default=None, repr=False)
    error: WorkerError | None = None

    @classmethod
    def failed(cls, exc: RecordIOError, image_shape: tuple[int, ...]) -> Batch:
        """An empty batch that carries ``exc`` to the training process."""
        return cls(torch.empty((0, *image_shape), dtype=torch.uint8), torch.empty(0, dtype=torch.int64), [],
                   error=WorkerError.of(exc))

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True): a pinned copy; the shared batch, and its slot, are released."""
        if self.error is not None:  # nothing to pin: the consumer raises the error
            return self
        flips = None if self.flips is None else self.flips.pin_memory()
        return Batch(self.pixels.pin_memory(), self.labels.pin_memory(), self.skipped, flips)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        flips = None if self.flips is None else self.flips.numpy()
        labels = self.labels.numpy()
        if self.slot is None:
            return _rebuild_batch, (self.pixels, labels, flips, self.skipped, self.error)
        ring = self.slot.ring
        return _rebuild_ring_batch, (ring.reference(self.slot.index), tuple(self.pixels.shape), labels, flips,
                                     self.skipped)


def _rebuild_batch(pixels: torch.Tensor, labels: np.ndarray, flips: np.ndarray | None,
                   skipped: list[CorruptRecord], error: WorkerError | None = None) -> Batch:
    """Unpickling a batch in a fresh segment (no ring)."""
    return Batch(pixels, torch.from_numpy(labels), skipped, None if flips is None else torch.from_numpy(flips),
                 error=error)


@dataclass(frozen=True)
class RingRef:
    """What a ring batch sends instead of its pixels: the ring's token (worker pid, random tag), the slot,
    and, until the training process has marked them known, the ring's flags and the slot's segment."""

    token: tuple[int, int]
    index: int
    flags: torch.Tensor | None
    buffer: torch.Tensor | None


def _rebuild_ring_batch(ref: RingRef, shape: tuple[int, ...], labels: np.ndarray, flips: np.ndarray | None,
                        skipped: list[CorruptRecord]) -> Batch:
    """Unpickling a ring batch in the training process: its pixels over the kept mapping, leased."""
    return _rebuild_batch(_KNOWN.pixels(ref, shape), labels, flips, skipped)


class _KnownRings:
    """The training process's side of the rings: each worker ring's flags and the segments it has been
    sent, kept mapped (a ring's ``slots`` segments, the same pages as the worker's: no memory of their own),
    and the leases on the ring batches it has handed out.

    Flags layout (the worker's shared uint8 array, ``2 * slots + 1``): ``[k]`` slot k busy (set by the
    worker, cleared here once the batch is gone); ``[slots + k]`` segment k known here; ``[-1]`` the
    flags known here. A ring whose worker process has exited is dropped when another ring arrives, or
    before a loader starts new workers (:func:`release_exited_rings`).

    A lease is a ``StorageWeakRef`` (torch.multiprocessing's own weak reference to a storage, the one its
    sharing cache uses) to the storage of the tensor handed out, a storage of its own over the kept
    mapping (``torch.frombuffer``): it expires exactly when the last tensor, view, numpy array or storage
    object made from the batch is gone (tests/data_pipeline/test_worker_batches.py pins that). Checked on
    every arrival; arrivals come from the DataLoader's pin-memory thread or the main thread, hence the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rings: dict[tuple[int, int], tuple[np.ndarray, dict[int, torch.Tensor]]] = {}
        self._held: list[tuple[StorageWeakRef, np.ndarray, int]] = []
        self.segments_received = 0  # ring segments that came with a batch (mapped or already known)

    def pixels(self, ref: RingRef, shape: tuple[int, ...]) -> torch.Tensor:
        with self._lock:
            self._release_expired()
            flags, buffers = self._learn(ref)
            base = buffers.get(ref.index)
            if base is None:
                raise RuntimeError(f"a batch of DataLoader worker {ref.token[0]} names ring slot {ref.index}, "
                                   "whose segment this process was never sent")
            n = int(np.prod(shape))
            # a storage of its own over the kept mapping (it holds the mapping alive): what the lease watches
            pixels = torch.frombuffer(base.numpy(), dtype=torch.uint8, count=n).view(shape)
            self._held.append((StorageWeakRef(pixels.untyped_storage()), flags, ref.index))
            return pixels

    def _learn(self, ref: RingRef) -> tuple[np.ndarray, dict[int, torch.Tensor]]:
        known = self._rings.get(ref.token)
        if known is None:
            if ref.flags is None:
                raise RuntimeError(f"a batch of DataLoader worker {ref.token[0]} names a ring this process was "
                                   "never sent")
            self._drop_exited()
            known = self._rings[ref.token] = (ref.flags.numpy(), {})
            known[0][-1] = 1
        flags, buffers = known
        if ref.buffer is not None:
            self.segments_received += 1
            if ref.index not in buffers:
                buffers[ref.index] = ref.buffer
                slots = (len(flags) - 1) // 2
                flags[slots + ref.index] = 1
        return known

    def drop_exited(self) -> None:
        with self._lock:
            self._drop_exited()

    def _drop_exited(self) -> None:
        if os.name != "posix":  # os.kill(pid, 0) is a liveness probe on POSIX only (a reaped pid: gone)
            return
        for token in list(self._rings):
            try:
                os.kill(token[0], 0)
            except ProcessLookupError:
                del self._rings[token]
            except PermissionError:
                pass

    def _release_expired(self) -> None:
        keep = []
        for ref, flags, index in self._held:
            if ref.expired():
                flags[index] = 0  # nothing here reads the batch any more: the worker may write again
            else:
                keep.append((ref, flags, index))
        self._held = keep

    def stats(self) -> dict[str, int]:
        with self._lock:
            self._release_expired()
            return {"rings": len(self._rings), "segments_received": self.segments_received,
                    "leases": len(self._held)}


_KNOWN = _KnownRings()


def held_leases() -> int:
    """How many ring batches this process still holds (for tests and diagnostics)."""
    return _KNOWN.stats()["leases"]


def release_exited_rings() -> None:
    """Unmap the rings of workers that have exited (a loader calls it before it starts new workers: the
    shared memory of the last epoch's rings is then free before the new ones are made)."""
    _KNOWN.drop_exited()


def ring_stats() -> dict[str, int]:
    """This process's side of the rings (for tests and diagnostics): ``rings`` kept mapped,
    ``segments_received`` (how many ring batches came with their segment), ``leases`` held."""
    return _KNOWN.stats()


class BatchRing:
    """One worker process's reusable batch buffers: at most ``slots`` segments, each busy from the
    moment the worker takes it until the training process has let go of the batch written into it."""

    def __init__(self, slots: int) -> None:
        self.slots = max(slots, 1)
        self.token = (os.getpid(), secrets.randbits(62))
        self.flags = shared_uint8((2 * self.slots + 1,))
        self.flags.zero_()
        self._flags = self.flags.numpy()
        self.buffers: list[torch.Tensor] = []

    def take(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, Slot | None]:
        """A (shape) uint8 buffer in shared memory and its slot; a fresh segment (slot None) when
        every slot is busy or holds another image size."""
        busy = self._flags
        for k, buf in enumerate(self.buffers):
            if busy[k] == 0 and buf.shape[1:] == shape[1:] and buf.shape[0] >= shape[0]:
                busy[k] = 1
                return buf[: shape[0]], Slot(self, k)
        if len(self.buffers) < self.slots:
            self.buffers.append(shared_uint8(shape))
            k = len(self.buffers) - 1
            busy[k] = 1
            return self.buffers[k], Slot(self, k)
        return shared_uint8(shape), None

    def release(self, index: int) -> None:
        """Slot ``index`` is free again: its batch was never sent."""
        self._flags[index] = 0

    def reference(self, index: int) -> RingRef:
        """How slot `index` travels: the flags and the segment only until the training process knows them."""
        flags = None if self._flags[-1] else self.flags
        buffer = None if self._flags[self.slots + index] else self.buffers[index]
        return RingRef(self.token, index, flags, buffer)


_RING: BatchRing | None = None


def worker_buffer(shape: tuple[int, ...], slots: int) -> tuple[torch.Tensor, Slot | None]:
    """In a DataLoader worker: a shared buffer for the next batch from this process's ring (made on
    first use; keyed by pid, so a ring inherited through fork is never shared with the parent)."""
    global _RING
    if slots <= 0:
        return shared_uint8(shape), None
    if _RING is None or _RING.token[0] != os.getpid():
        _RING = BatchRing(slots)
    return _RING.take(shape)


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
