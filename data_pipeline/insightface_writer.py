"""Writing an insightface-layout dataset (the layout: :mod:`data_pipeline.insightface`, which
re-exports :class:`InsightFaceWriter`)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_pipeline.atomic import AtomicFile, CommitOrAbort, Leftover, folder_lock
from data_pipeline.key_ranges import FLOAT32_EXACT_LIMIT, range_header
from data_pipeline.property_file import (
    dataset_leftovers,
    other_property_path,
    prefix_path,
    property_text,
    written_property_path,
)
from data_pipeline.record_format import IRHeader, pack
from data_pipeline.record_writer import RecordWriter

__all__ = ["InsightFaceWriter", "remove_leftovers"]

log = logging.getLogger(__name__)


def remove_leftovers(prefix: str | os.PathLike[str]) -> list[Leftover]:
    """Remove the temporary files of ``prefix``'s dataset names that a killed writer left (a ``.rec``
    can be hundreds of GiB), and the old files a killed overwrite had set aside (backups), when their
    writer is known to be gone (this host, pid not running, no lock held: see :class:`Leftover`), saying
    so in a log line; the others may belong to a write in progress (another host, a live pid) and are
    only named. Returns the ones removed."""
    removed = []
    # under the folder's lock: a live overwrite (whichever pid namespace) finishes its renames first, so a
    # backup seen here is a killed one's, never the old dataset of a swap in progress
    with folder_lock(Path(prefix).parent):
        for left in dataset_leftovers(prefix):
            what = f"{left.describe()}{' (a backup of the old ' + str(left.final) + ')' if left.backup else ''}"
            if not left.gone:
                log.warning("kept %s: the write that made it may still be running; delete it once it is not", what)
                continue
            with contextlib.suppress(FileNotFoundError):
                left.path.unlink()
                removed.append(left)
                log.warning("removed %s, left by an earlier write of %s that did not finish", what, prefix)
    return removed


class InsightFaceWriter(CommitOrAbort):
    """Write an insightface-layout dataset, one identity at a time.

    ``add_identity(jpegs)`` appends the images of one class and returns its class id (0, 1, ...).
    ``close()`` fills in the header record 0, appends the identity records, and writes the property
    file: ``<dir>/property`` when the prefix's name is ``train`` (MS1M convention; a ``train.property``,
    which the reader would take first, goes with the old dataset), else ``PREFIX.property``.
    Byte-identical to the same records written by MXNet. Temporary files an earlier write of the same
    names left when it was killed are removed first (:func:`remove_leftovers`).

    Overwriting a dataset: any failure (a full disk, Ctrl-C, a rename that fails) before ``close()``
    returns removes the new files, puts the old ones back and re-raises: the old dataset stays whole. The
    first rename comes only once every record, the header and the property are written and synced; from
    there on the old files are set aside under backup names (the property first) and the new property
    appears last, so a crash in between leaves a dataset with no property file, which ``pfc data inspect``
    and the readers refuse, with the old files under their backup names, never old and new files mixed
    under a property (the order: :meth:`RecordWriter.close`). The next write removes backups whose
    writer is gone, as it removes temporary files (:func:`remove_leftovers`).
    """

    def __init__(self, prefix: str | os.PathLike[str], image_size: tuple[int, int] = (112, 112)):
        self.prefix = Path(prefix)
        self.rec_path = prefix_path(prefix, ".rec")
        self.idx_path = prefix_path(prefix, ".idx")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.property_path = written_property_path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(prefix)
        self._writer = RecordWriter(self.rec_path, self.idx_path)
        # header placeholder: same encoded size as the final one, patched in close()
        self._header_offset = self._writer.write(0, pack(IRHeader(0, [0.0, 0.0], 0, 0), b""))
        self._next_key = 1
        # identity ranges as a growing int64 array (16 B per class, no Python tuple per class)
        self._ranges = np.empty((1024, 2), dtype=np.int64)
        self._num_classes = 0
        self._closed = False

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def num_images(self) -> int:
        return self._next_key - 1

    def add_identity(self, images: Sequence[bytes]) -> int:
        """Append the encoded images of one identity; returns its class id."""
        if self._closed:
            raise ValueError(f"{self.rec_path}: writer is closed")
        if len(images) == 0:
            raise ValueError(f"{self.rec_path}: identity {self._num_classes} has no images")
        cid = self._num_classes
        if cid + 1 > FLOAT32_EXACT_LIMIT:
            raise ValueError(f"{self.rec_path}: class id {cid} reaches 2**24; float32 labels cannot hold it")
        first = self._next_key
        # keys past 2**24 are fine: identity and header records get their exact range in id/id2
        for img in images:
            self._writer.write(self._next_key, pack(IRHeader(0, float(cid), self._next_key, 0), img))
            self._next_key += 1
        if cid == len(self._ranges):
            self._ranges = np.resize(self._ranges, (2 * len(self._ranges), 2))
        self._ranges[cid] = (first, self._next_key)
        self._num_classes += 1
        return cid

    def close(self) -> None:
        """Write identity records, the real header record and the property file, then commit them all."""
        if self._closed:
            return
        self._closed = True
        # the property is written and synced under a temporary name of its own with the .rec and .idx,
        # and renamed into place last, by the writer's close, which puts the old one back on a failure
        prop: AtomicFile | None = None
        try:
            id_start = self._next_key
            for c, (a, b) in enumerate(self._ranges[:self._num_classes].tolist()):
                key = id_start + c
                self._writer.write(key, pack(range_header(a, b, key), b""))
            id_end = id_start + self._num_classes
            self._writer.patch(self._header_offset, pack(range_header(id_start, id_end, 0), b""))
            prop = AtomicFile(self.property_path, "w")
            prop.file.write(property_text(self._num_classes, self.image_size))
            # a stale train.property would shadow the new <dir>/property: it goes with the old dataset
            other = other_property_path(self.prefix)
            self._writer.close(remove_first=[other] if other is not None else [], then=[prop])
        except BaseException:
            # nothing may be committed unless every record is written: a header record 0 still [0, 0]
            # would replace a good dataset with an unreadable one
            self._writer.abort()
            if prop is not None:
                prop.discard()
            raise

    def abort(self) -> None:
        """Stop without finishing: nothing appears under the dataset's names (the ``.rec`` and ``.idx``
        were being written under temporary names, which are removed) and no property file is written, so
        the incomplete dataset cannot be mistaken for a complete one."""
        if not self._closed:
            self._closed = True
            self._writer.abort()
