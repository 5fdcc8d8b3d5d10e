"""``RecordWriter``: a ``.rec`` and its ``.idx``, byte-identical to MXNet's ``MXIndexedRecordIO``.

Both files are written under temporary names (:mod:`data_pipeline.atomic`) and appear only when the
write completes (what overwriting a dataset guarantees: :meth:`RecordWriter.close`). One writer per
dataset, in one process (the packer, the synthetic generator): ranks never write datasets. Imported
through :mod:`data_pipeline.recordio`, the interface.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from data_pipeline.atomic import AtomicFile, CommitOrAbort, fsync_dir
from data_pipeline.record_chunks import encoded_size
from data_pipeline.record_format import encode_record
from data_pipeline.written_keys import WrittenKeys

__all__ = ["RecordWriter"]


class RecordWriter(CommitOrAbort):
    """Write records and their ``.idx`` byte-identically to MXNet's ``MXIndexedRecordIO``.

    ``with RecordWriter(rec, idx) as w: w.write(key, record)``; ``idx_path=None`` writes no index
    (like ``MXRecordIO``). ``write`` returns the record's byte offset.

    Both files are written under temporary names (``data_pipeline.atomic``) and appear under their own
    names, fsync-ed, only when :meth:`close` ends a complete write; :meth:`abort` (or an exception leaving
    the ``with`` block) removes them. What a failure or a crash during :meth:`close` leaves: see there.
    """

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str] | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = None if idx_path is None else Path(idx_path)
        self._rec_file = AtomicFile(self.rec_path, "w+b")  # read back by the writer's own checks
        self._idx_file = None if self.idx_path is None else AtomicFile(self.idx_path, "w", newline="\n")
        self._rec = self._rec_file.file
        self._idx = None if self._idx_file is None else self._idx_file.file
        self._pos = 0
        self._written = WrittenKeys()  # refuses a duplicate key at 8 B per key

    @property
    def tell(self) -> int:
        """Byte offset where the next record goes."""
        return self._pos

    def write(self, key: int, record: bytes | bytearray | memoryview) -> int:
        """Append one record (IRHeader and payload, e.g. from :func:`pack`) under ``key``."""
        if self._rec.closed:
            raise ValueError(f"{self.rec_path}: writer is closed")
        key = int(key)
        if self._written.seen(key):
            raise ValueError(f"{self.rec_path}: key {key} was already written; keys must be unique")
        data = encode_record(record)
        offset = self._pos
        self._rec.write(data)
        if self._idx is not None:
            self._idx.write(f"{key}\t{offset}\n")
        self._written.add(key)
        self._pos += len(data)
        return offset

    def patch(self, offset: int, record: bytes | bytearray | memoryview) -> None:
        """Replace the record written at ``offset`` by one of the same encoded size (used to fill in
        a header record whose content is only known at the end)."""
        data = encode_record(record)
        self._rec.flush()
        old = encoded_size(self._rec.fileno(), offset, self._pos)
        if old is None:
            raise ValueError(f"{self.rec_path}: no record was written at byte offset {offset}")
        if old != len(data):
            raise ValueError(f"{self.rec_path}: the record at byte offset {offset} takes {old} bytes, the "
                             f"replacement {len(data)}; a patch must keep the size")
        self._rec.flush()
        self._rec.seek(offset)
        self._rec.write(data)
        self._rec.seek(self._pos)

    def close(self, *, remove_first: Sequence[Path] = ()) -> None:
        """Finish: sync both files, then move them into place. On any failure (an exception, Ctrl-C) the
        temporary files are removed and the exception propagates.

        What the final names hold when an existing ``.rec``/``.idx`` is overwritten:

        * a failure while flushing or syncing (a full disk, a file-size limit) comes before anything is
          removed or renamed: the old files are untouched;
        * then the files named in ``remove_first`` (a caller's companion file that belongs to the old
          dataset, e.g. its property file) and the old ``.idx`` are removed, and the ``.rec``, then the
          ``.idx`` renamed into place, each step made durable (directory ``fsync``) before the next. A crash
          or a failure during these steps leaves the old pair with its ``remove_first`` files, or a
          ``.rec`` (old or new) with no ``.idx``, or the new pair: never the new ``.rec`` with the old
          ``.idx`` (whose offsets point into another file, which could still read as a dataset), and
          never a ``remove_first`` file beside a new or incomplete pair.
        """
        if self._rec_file.done:  # closed or aborted already
            return
        try:
            # everything that can fail on a full disk, before the first removal or rename
            for f in (self._rec, self._idx):
                if f is not None:
                    f.flush()
                    os.fsync(f.fileno())
            for old in (*remove_first, *([] if self.idx_path is None else [self.idx_path])):
                _remove_durably(old)
            self._rec_file.commit()
            if self._idx_file is not None:
                self._idx_file.commit()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Stop without finishing: the temporary files are removed, nothing appears under the final names."""
        self._rec_file.discard()
        if self._idx_file is not None:
            self._idx_file.discard()


def _remove_durably(path: Path) -> None:
    """Remove ``path`` if it exists and make that survive a power loss before the next rename."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        fsync_dir(path.parent)
