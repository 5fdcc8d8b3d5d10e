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
are ``real_offset + copy * file_size``: copy j holds one chunk of the epoch plan, and sorting by
the virtual offset keeps the chunks in plan order (each chunk's records come in file order). Rank
k's contiguous shard of that index is exactly its block of :func:`data_pipeline.dataset.shard_plan`
(the same samples per rank as the torch path, only each chunk read in file order). With chunks of
a few hundred batches, consecutive samples are spread over the whole file, so a batch is a near
uniform sample of identities; ``random_shuffle`` with a buffer mixes further inside each rank.
DALI memory-maps each listed copy lazily as it reaches it (one at a time), so the copies cost no
extra I/O. Without shuffling, the plain image-only ``.idx`` from
:meth:`InsightFaceReader.write_image_idx` is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.insightface import InsightFaceReader

READER_NAME = "Reader"


def image_offsets(reader: InsightFaceReader) -> np.ndarray:
    """Byte offset of each image record, aligned with ``reader.image_keys`` (int64)."""
    rr = reader.reader
    keys, offsets = rr.key_array, rr.offset_array
    order = np.argsort(keys, kind="stable")
    img = np.asarray(reader.image_keys, dtype=np.int64)
    pos = np.searchsorted(keys[order], img)
    return offsets[order[pos]].astype(np.int64)


@dataclass
class EpochIndex:
    """What one epoch's DALI reader is given, and the order it will deliver."""

    idx_path: Path
    rec_paths: list[str]      # the .rec repeated once per chunk
    order: np.ndarray         # (world_size, L') image indices in the order each rank's shard delivers them


def chunked_order(block: np.ndarray, offsets: np.ndarray, chunk: int, start: int = 0) -> list[np.ndarray]:
    """Split one rank's plan block into chunks of `chunk` items (boundaries at multiples of `chunk`
    of the full block), each sorted by byte offset as DALI will read it, and drop the first `start`
    items of that reading order. Returns the chunks (non-empty)."""
    chunks = []
    for a in range(0, len(block), chunk):
        part = block[a:a + chunk]
        chunks.append(part[np.argsort(offsets[part], kind="stable")])
    out: list[np.ndarray] = []
    skip = start
    for c in chunks:
        if skip >= len(c):
            skip -= len(c)
            continue
        out.append(c[skip:])
        skip = 0
    return out


def write_epoch_index(reader: InsightFaceReader, plan: np.ndarray, path: str | os.PathLike[str],
                      chunk: int, start: int = 0) -> EpochIndex:
    """Write the virtual-offset index for an epoch plan (see the module docstring).

    plan: (world_size, L) image indices (from ``shard_plan``); every rank's block is cut into chunks
    of `chunk` items; `start` items already consumed by every rank are left out (exact resume).
    The written index has world_size * (L - start) entries, so DALI's shard k (of world_size) is
    exactly rank k's remaining block.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    offsets = image_offsets(reader)
    keys = np.asarray(reader.image_keys, dtype=np.int64)
    fsize = int(reader.reader.file_size)
    rows: list[np.ndarray] = []
    key_parts: list[np.ndarray] = []
    off_parts: list[np.ndarray] = []
    copy = 0
    for block in plan:
        chunks = chunked_order(np.asarray(block, dtype=np.int64), offsets, chunk, start)
        rows.append(np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int64))
        for c in chunks:
            key_parts.append(keys[c])
            off_parts.append(offsets[c] + copy * fsize)
            copy += 1
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if key_parts:
        table = np.stack([np.concatenate(key_parts), np.concatenate(off_parts)], axis=1)
        text = "\n".join(f"{k}\t{o}" for k, o in table.tolist()) + "\n"
    else:
        text = ""
    tmp.write_text(text)
    os.replace(tmp, path)
    return EpochIndex(idx_path=path, rec_paths=[str(reader.rec_path)] * max(copy, 1), order=np.stack(rows))


def build_pipeline(rec_paths: list[str], idx_path: str | os.PathLike[str], *, shard_id: int, num_shards: int,
                   batch_size: int, num_threads: int, device_id: int | None, seed: int,
                   flip_prob: float = 0.5, random_shuffle: bool = False, initial_fill: int = 1024,
                   prefetch_queue_depth: int = 2, uint8: bool = False) -> Any:
    """The built DALI pipeline of one rank.

    Outputs per sample: image float32 (3, H, W) in [-1, 1] ((x - 127.5) / 127.5), mirrored with
    probability `flip_prob`; with ``uint8`` the decoded pixels (H, W, 3) uint8, mirrored the same
    way, left for the consumer to normalise on its device (half the pipeline's work on the CPU
    is otherwise the float conversion); label int64 (1,). device_id None: CPU decode, outputs on the CPU;
    else ``mixed`` decode and both outputs on GPU `device_id`. shard_id is the global rank and
    num_shards the world size.
    """
    from nvidia.dali import fn, pipeline_def, types

    decode_device = "cpu" if device_id is None else "mixed"

    # device_id None (CPU only) is valid for DALI but not in its type stubs
    options: dict[str, Any] = dict(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                                   seed=seed, prefetch_queue_depth=prefetch_queue_depth)

    @pipeline_def(**options)
    def graph() -> Any:
        jpegs, labels = fn.readers.mxnet(
            path=list(rec_paths), index_path=[str(idx_path)], shard_id=shard_id, num_shards=num_shards,
            random_shuffle=random_shuffle, initial_fill=initial_fill, stick_to_shard=True,
            pad_last_batch=False, name=READER_NAME)
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.DALIImageType.RGB)
        mirror = fn.random.coin_flip(probability=flip_prob) if flip_prob > 0 else 0
        if uint8:
            images = fn.flip(images, horizontal=mirror) if flip_prob > 0 else images
        else:
            images = fn.crop_mirror_normalize(images, dtype=types.DALIDataType.FLOAT, output_layout="CHW",
                                              mean=[127.5] * 3, std=[127.5] * 3, mirror=mirror)
        # labels come out as float32: exact for class ids < 2**24 (checked when the file is written)
        labels = fn.cast(labels, dtype=types.DALIDataType.INT64)
        if device_id is not None:
            labels = labels.gpu()
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
