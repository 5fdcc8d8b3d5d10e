"""The DALI graph: ``fn.readers.mxnet`` -> image decoder -> random flip -> [-1, 1] CHW float, labels.

NVIDIA DALI is optional: nothing here imports ``nvidia.dali`` at module import time.

Two facts about DALI's RecordIO reader (measured with nvidia-dali 2.4 on the project's files) shape
how it is fed:

* it accepts exactly one index file, and **sorts the index entries by byte offset** before reading
  and sharding. A permuted ``.idx`` therefore does *not* change the reading order; shard k is the
  k-th contiguous range of the file in offset order (for an MS1M file sorted by identity: a fixed
  set of identities per rank, every epoch);
* with several ``path`` entries, the index offsets address the concatenation of those files.

So for a global shuffle we list the same ``.rec`` several times and write one index whose offsets
are ``real_offset + copy * file_size``: copy j holds one chunk of the rank's block, and sorting by
the virtual offset keeps the chunks in plan order (each chunk's records come in file order). Each
rank writes only its own block (:func:`data_pipeline.dataset.rank_block`, computed alone in O(N/W))
and reads it as DALI's only shard: the same samples per rank as the torch path, only each chunk
read in file order. The index is streamed to disk chunk by chunk (never one text of the whole). With chunks of
a few hundred batches, consecutive samples are spread over the whole file, so a batch is a near
uniform sample of identities; ``random_shuffle`` with a buffer mixes further inside each rank.
DALI memory-maps each listed copy lazily as it reaches it (one at a time), so the copies cost no
extra I/O. Without shuffling, the plain image-only ``.idx`` from
:meth:`InsightFaceReader.write_image_idx` is used.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from data_pipeline.atomic import AtomicFile
from data_pipeline.index_file import strictly_increasing, write_index_lines
from data_pipeline.insightface import InsightFaceReader

READER_NAME = "Reader"


def image_offsets(reader: InsightFaceReader) -> np.ndarray:
    """Byte offset of each image record, aligned with ``reader.image_key_array`` (int64; a view of
    the index when the images are one slice of it)."""
    rr = reader.reader
    if reader._image_range is not None:
        lo, hi = reader._image_range
        return rr.offset_array[lo:hi]
    return rr.offset_array[rr.positions(reader.image_key_array)]


@dataclass
class EpochIndex:
    """What one rank's DALI reader is given for an epoch, and the order it will deliver."""

    idx_path: Path
    rec_paths: list[str]          # the .rec repeated once per chunk
    order: dict[int, np.ndarray]  # {rank: image indices in the order this rank's reader delivers them}
    rank: int = 0
    epoch: int = 0
    start: int = 0


def chunked_order(block: np.ndarray, offsets: np.ndarray, chunk: int, start: int = 0,
                  stop: int | None = None) -> list[np.ndarray]:
    """Split one rank's plan block into chunks of `chunk` items (boundaries at multiples of `chunk`
    of the full block), each sorted by byte offset as DALI will read it, and keep items
    ``start:stop`` of that reading order. Returns the (non-empty) pieces of the chunks kept."""
    stop = len(block) if stop is None else min(stop, len(block))
    out: list[np.ndarray] = []
    ordered = strictly_increasing(offsets)
    for a in range(0, len(block), chunk):
        b = min(a + chunk, len(block))
        if b <= start or a >= stop:
            continue
        part = block[a:b]
        # offsets increasing with the image index (the usual file): sorting the indices is enough
        part = np.sort(part) if ordered else part[np.argsort(offsets[part], kind="stable")]
        out.append(part[max(start - a, 0):min(stop, b) - a])
    return out


def _repeat_lone_last_line(f: IO[bytes], keys: np.ndarray, offsets: np.ndarray, last: np.ndarray, copy: int,
                           fsize: int) -> None:
    """Write the index's final line a second time when it is the only entry of its copy (copy > 0).

    DALI's ``RecordIOLoader::ReadIndexFile`` (2.4) moves on to the next listed file only inside its
    loop over the entries but the last; the last one keeps the file of the entry before it. Alone in
    the last copy, it is then read from the copy before, at an offset past that file's end ("Invalid
    seek"): with the default chunk of one batch whenever a rank's part is one more than a multiple of
    the batch size, or where a segment ends one item into a chunk. Written twice, the first line goes
    through the loop, which moves to the right file, and DALI drops the zero-size entry between the
    two (the delivered order is unchanged).
    """
    if copy > 0 and len(last) == 1:
        write_index_lines(f, keys[last], offsets[last] + copy * fsize)


def write_rank_index(reader: InsightFaceReader, block: np.ndarray, path: str | os.PathLike[str], chunk: int,
                     start: int = 0, stop: int | None = None, *, rank: int = 0, epoch: int = 0) -> EpochIndex:
    """Write the virtual-offset index of (part of) one rank's block (see the module docstring), streamed.

    block: this rank's image indices for the epoch (``rank_block``), cut into chunks of `chunk`
    items; items ``start:stop`` of the reading order are listed (a segment of the epoch, or the
    rest of it after `start` items already consumed). Read as a single shard.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    offsets = image_offsets(reader)
    keys = reader.image_key_array
    fsize = int(reader.reader.file_size)
    chunks = chunked_order(np.asarray(block, dtype=np.int64), offsets, chunk, start, stop)
    path = Path(path)
    with AtomicFile(path) as f:  # the loader's prefetch thread writes it while DALI may read the last one
        for copy, c in enumerate(chunks):
            write_index_lines(f, keys[c], offsets[c] + copy * fsize)
        if chunks:
            _repeat_lone_last_line(f, keys, offsets, chunks[-1], len(chunks) - 1, fsize)
    order = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int64)
    return EpochIndex(idx_path=path, rec_paths=[str(reader.rec_path)] * max(len(chunks), 1), order={rank: order},
                      rank=rank, epoch=epoch, start=start)


def write_epoch_index(reader: InsightFaceReader, plan: np.ndarray, path: str | os.PathLike[str],
                      chunk: int, start: int = 0) -> EpochIndex:
    """All ranks' blocks in one index (``plan``: (world_size, L) from ``shard_plan``), read with
    shard_id/num_shards = rank/world_size: for tests and tools; the loader writes
    :func:`write_rank_index` for its own block only."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    offsets = image_offsets(reader)
    keys = reader.image_key_array
    fsize = int(reader.reader.file_size)
    rows: dict[int, np.ndarray] = {}
    copy = 0
    last = np.empty(0, dtype=np.int64)
    with AtomicFile(path) as f:
        for rank, block in enumerate(plan):
            chunks = chunked_order(np.asarray(block, dtype=np.int64), offsets, chunk, start)
            rows[rank] = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int64)
            for c in chunks:
                write_index_lines(f, keys[c], offsets[c] + copy * fsize)
                copy += 1
                last = c
        if copy:
            _repeat_lone_last_line(f, keys, offsets, last, copy - 1, fsize)
    path = Path(path)
    return EpochIndex(idx_path=path, rec_paths=[str(reader.rec_path)] * max(copy, 1), order=rows, start=start)


def build_pipeline(rec_paths: list[str], idx_path: str | os.PathLike[str], *, shard_id: int, num_shards: int,
                   batch_size: int, num_threads: int, device_id: int | None, seed: int,
                   random_shuffle: bool = False, initial_fill: int = 1024,
                   prefetch_queue_depth: int = 2, uint8: bool = False,
                   flips: Callable[[], np.ndarray] | None = None) -> Any:
    """The built DALI pipeline of one rank.

    Outputs per sample: image float32 (3, H, W) in [-1, 1] ((x - 127.5) / 127.5), mirrored where the
    flips say; label int64 (1,) (of an array label the first value, as the torch path). With ``uint8``:
    the decoded pixels (H, W, 3) uint8 as they are, the label, and (when there are flips) a third
    output, the flip int32 () that says whether the consumer should mirror the image: normalising and
    mirroring are left to the consumer's device (on the CPU pipeline they are otherwise most of DALI's
    work besides decoding: the float conversion about 0.07 ms and ``fn.flip`` about 0.025 ms per
    112x112 image, next to a 0.11 ms decode).

    ``flips``: called once per batch, in reading order, for the batch's flip decisions ((batch_size,)
    bool or int); None flips nothing. The loader feeds the epoch plan's, so that they depend on the
    position in the epoch, not on where this pipeline started (a resumed run flips what the
    uninterrupted one did). ``seed`` drives DALI's own shuffle buffer (``random_shuffle``). device_id
    None: CPU decode, outputs on the CPU; else ``mixed`` decode and the outputs on GPU `device_id`.
    shard_id is the global rank and num_shards the world size.
    """
    from nvidia.dali import fn, pipeline_def, types

    decode_device = "cpu" if device_id is None else "mixed"

    # device_id None (CPU only) is valid for DALI but not in its type stubs
    options: dict[str, Any] = dict(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                                   seed=seed, prefetch_queue_depth=prefetch_queue_depth)

    def flip_batch() -> np.ndarray:
        assert flips is not None
        return np.ascontiguousarray(flips(), dtype=np.int32)

    @pipeline_def(**options)
    def graph() -> Any:
        jpegs, labels = fn.readers.mxnet(
            path=list(rec_paths), index_path=[str(idx_path)], shard_id=shard_id, num_shards=num_shards,
            random_shuffle=random_shuffle, initial_fill=initial_fill, stick_to_shard=True,
            pad_last_batch=False, name=READER_NAME)
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.DALIImageType.RGB)
        mirror: Any = 0
        if flips is not None:
            mirror = fn.external_source(source=flip_batch, batch=True, dtype=types.DALIDataType.INT32)
        if not uint8:
            images = fn.crop_mirror_normalize(images, dtype=types.DALIDataType.FLOAT, output_layout="CHW",
                                              mean=[127.5] * 3, std=[127.5] * 3, mirror=mirror)
        # a record with an array label (IRHeader flag > 0) comes out with all `flag` values: keep the
        # first, the class id, as the torch path (and insightface) do; shape (1,) for every record
        labels = labels[0:1]
        # labels come out as float32: exact for class ids < 2**24 (checked when the file is written)
        labels = fn.cast(labels, dtype=types.DALIDataType.INT64)
        if device_id is not None:
            labels = labels.gpu()
        if uint8 and not isinstance(mirror, int):
            return images, labels, mirror.gpu() if device_id is not None else mirror
        return images, labels

    pipe = graph()
    pipe.build()
    return pipe


def build_decode_pipeline(batch_size: int, num_threads: int, device_id: int | None, source: Any) -> Any:
    """A pipeline that only decodes encoded images fed by `source` (a callable returning a batch of
    numpy uint8 buffers): the decode ceiling used by ``pfc bench data``."""
    from nvidia.dali import fn, pipeline_def, types

    options: dict[str, Any] = dict(batch_size=batch_size, num_threads=num_threads, device_id=device_id)

    @pipeline_def(**options)
    def graph() -> Any:
        jpegs = fn.external_source(source=source, batch=True, dtype=types.DALIDataType.UINT8)
        return fn.decoders.image(jpegs, device="cpu" if device_id is None else "mixed",
                                 output_type=types.DALIImageType.RGB)

    pipe = graph()
    pipe.build()
    return pipe
