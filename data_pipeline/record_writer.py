"""``RecordWriter``: a ``.rec`` and its ``.idx``, byte-identical to MXNet's ``MXIndexedRecordIO``.

Both files are written under temporary names (:mod:`data_pipeline.atomic`) and appear only when the
write completes (what overwriting a dataset guarantees: :meth:`RecordWriter.close`). One writer per
dataset, in one process (the packer, the synthetic generator): ranks never write datasets. Imported
through :mod:`data_pipeline.recordio`, the interface.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

from data_pipeline.atomic import AtomicFile, CommitOrAbort, backup_name, folder_lock, fsync_dir
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
        try:
            self._idx_file = None if self.idx_path is None else AtomicFile(self.idx_path, "w", newline="\n")
        except BaseException:  # e.g. its temporary name held by another writer: the .rec's goes too
            self._rec_file.discard()
            raise
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

    def close(self, *, remove_first: Sequence[Path] = (), then: Sequence[AtomicFile] = ()) -> None:
        """Finish: sync both files (and ``then``), then move them into place. ``remove_first``: a caller's
        files that belong to the old dataset and go with it (e.g. a stale ``train.property``); ``then``: the
        caller's own new files (written, not yet committed: e.g. the property file), placed after the pair
        under the same rules. On any failure (an exception, Ctrl-C) the new files are removed, the old
        ones put back, and the exception propagates.

        Overwriting an existing ``.rec``/``.idx``, step by step, each made durable (directory ``fsync``)
        before the next; what a crash (SIGKILL, a power loss) after each step leaves under the final names:

        1. flush and fsync the new files (a full disk or a file-size limit fails here): nothing changed;
        2. set the old ``remove_first`` files and the old files ``then`` replaces aside, renamed to their
           :func:`~data_pipeline.atomic.backup_name` (``.NAME.old-HOST-PID``): the old pair with no
           property file, which ``pfc data inspect`` and the readers refuse;
        3. set the old ``.idx`` aside: the old ``.rec`` alone; 4. the old ``.rec``: no dataset file;
        5. rename the new ``.rec`` into place: the new ``.rec`` alone; 6. the new ``.idx``: the new pair;
        7. the ``then`` files: the new dataset, whole;
        8. remove the backups.

        Never the new ``.rec`` with the old ``.idx`` (whose offsets point into another file, which could
        still read as a dataset), never an old ``remove_first`` or property file beside a new or incomplete
        pair. Until step 8 the old files are under their backup names: a crash leaves them there (inspect
        names them; renamed back, they are the old dataset; the next pack removes them). A crash during step 8
        leaves some of the backups beside the new dataset, whole: delete them, never rename them back (the old
        ``.rec`` back alone would meet the new ``.idx``). A failure
        (an exception) in steps 2-7 undoes the steps done, in reverse order (the same states again): the
        old files, complete, are back under their names; a second failure during that undo leaves what a
        crash there would.
        """
        if self._rec_file.done:  # closed or aborted already
            return
        files = [f for f in (self._rec_file, self._idx_file, *then) if f is not None]
        swap = _Swap()
        try:
            for f in files:  # everything that can fail on a full disk, before the first rename
                f.sync()
            # steps 2-8 under the folder's lock: another overwrite's renames wait (never interleaved with
            # ours), and no sweep removes our backups while they are the old dataset
            with folder_lock(self.rec_path.parent):
                try:
                    for old in (*remove_first, *(f.path for f in then),
                                *([] if self.idx_path is None else [self.idx_path]), self.rec_path):
                        swap.set_aside(old)
                    for f in files:
                        swap.place(f)
                except BaseException:
                    swap.undo()
                    raise
                for f in files:
                    f.commit()  # placed already: closes it, releasing its lock
                swap.drop_backups()
        except BaseException:
            self.abort()
            for f in then:
                f.discard()
            raise

    def abort(self) -> None:
        """Stop without finishing: the temporary files are removed, nothing appears under the final names."""
        self._rec_file.discard()
        if self._idx_file is not None:
            self._idx_file.discard()


class _Swap:
    """The renames of one :meth:`RecordWriter.close`: the old files set aside under their backup names and
    the new files placed, each made durable before the next, remembered so that :meth:`undo` can reverse
    them."""

    def __init__(self) -> None:
        self.aside: list[tuple[Path, Path]] = []  # (final name, the backup holding its old file)
        self.placing: list[AtomicFile] = []

    def set_aside(self, path: Path) -> None:
        """Rename the old file at ``path`` (if any) to its backup name."""
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISDIR(mode):  # a rename would move it, and nothing could remove the backup
            raise IsADirectoryError(errno.EISDIR, "a folder where a dataset file goes; expected a file", str(path))
        backup = backup_name(path)
        os.replace(path, backup)
        self.aside.append((path, backup))
        fsync_dir(path.parent)

    def place(self, f: AtomicFile) -> None:
        self.placing.append(f)
        f.place()

    def undo(self) -> None:
        """Remove the new files placed (the last first), then put the old ones back (the last first): the
        reverse order keeps the new ``.rec`` from ever meeting the old ``.idx``."""
        for f in reversed(self.placing):
            if f.placed:
                _quietly(os.unlink, f.path)
        for path, backup in reversed(self.aside):
            _quietly(os.replace, backup, path)

    def drop_backups(self) -> None:
        """The new files are in place: remove the old ones."""
        for _, backup in self.aside:
            with contextlib.suppress(OSError):
                os.unlink(backup)
        for folder in {path.parent for path, _ in self.aside}:
            with contextlib.suppress(OSError):
                fsync_dir(folder)


def _quietly(step: Callable[..., None], *paths: Path) -> None:
    """One step of an undo, made durable; an error there must not hide the failure being undone (what it
    leaves is what a crash at that step leaves)."""
    with contextlib.suppress(OSError):
        step(*paths)
        fsync_dir(paths[-1].parent)
