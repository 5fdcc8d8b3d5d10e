"""Atomic, durable file writes: the one helper every file of a run folder or a dataset goes through.

A file is written under a temporary name in its own directory, flushed, ``fsync``-ed, renamed over the
final name (``os.replace``, atomic on POSIX) and the directory is ``fsync``-ed, so that after a crash or a
power loss the final name holds either the old complete file or the new complete one, never a torn one,
and a rename that a pointer (``latest``) relies on is itself on disk.

Why it lives in ``data_pipeline``: imports run ``launcher -> partialfc -> discface`` and
``launcher -> data_pipeline``, and the dataset writers (``RecordWriter``, the property file, the ``.idx``
and its cache, DALI's epoch index, the verification ``.bin``) need it while ``data_pipeline`` imports no
other package; ``launcher`` (checkpoints, reports, the ``latest`` pointer) imports it from here. It is the
project's one copy of the write-to-temporary-then-rename dance for a file. ``partialfc`` writes no files
itself: its head checkpoint and backbone files take the writer from their caller, which passes
:func:`atomic_write`.

* :func:`atomic_write` ``(path, data_or_writer)`` -- ``bytes``/``str`` content, or a callable that writes
  the temporary file given its path (``safetensors.torch.save_file``, ``torch.save``...).
* :class:`AtomicFile` -- a file object for streaming writers (``commit()`` renames into place,
  ``discard()`` removes the temporary file). It holds an exclusive ``flock`` on its temporary file while
  open, so that a leftover check elsewhere can tell that its writer is alive.
* :func:`fsync_dir` -- make a rename or an unlink inside ``path`` durable.
* :func:`leftover_temps` -- the temporary files of a final name that a killed writer (SIGKILL, a power
  loss: no ``except`` ran) left behind, and the backups (:func:`backup_name`) an overwrite killed while it
  swapped a dataset's files left, each with whether its writer is known to be gone.

A failure at any point (a full disk, a file-size limit) removes the temporary file and re-raises the
original exception unchanged; the final name is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

log = logging.getLogger(__name__)

__all__ = ["AtomicFile", "CommitOrAbort", "Leftover", "atomic_write", "backup_name", "describe_error", "folder_lock",
           "fsync_dir", "fsync_file", "leftover_temps", "temp_name"]


def _fsync_path(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """``fsync`` a directory, so that renames and unlinks inside it survive a power loss."""
    _fsync_path(path)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """``fsync`` a file written (and closed) by someone else's writer."""
    _fsync_path(path)


#: the file ``folder_lock`` locks where the folder itself cannot be (NFS); kept, since removing a lock file races
FOLDER_LOCK_FILE = ".pfc-dataset.lock"


def _flock(path: str | os.PathLike[str], flags: int) -> int | None:
    """An fd of ``path`` (opened with ``flags``) holding an exclusive ``flock`` (waited for), or None."""
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the directory ``folder`` for the block: what a dataset overwrite holds
    while its old files are under backup names, and what a leftover sweep takes before judging backups.

    Two overwrites of one dataset at once (two ``pfc data pack`` into one output) interleaved their renames:
    one set the other's new ``.rec`` aside and the other then put its ``.idx`` over the first's, leaving a
    ``.rec`` with another write's ``.idx``; and a sweep in another pid namespace took a live overwrite's
    backups for a dead one's (the pid in their names not running there) and removed them. The lock belongs
    to the kernel's open file, seen from every namespace, and goes with a killed holder. Held for renames
    only (milliseconds), it serialises every dataset of the folder.

    Where the folder cannot be locked (NFS fails ``flock`` on a directory) :data:`FOLDER_LOCK_FILE` in it is;
    where neither can be (a read-only folder, no locks at all), the folder is used unlocked, with a warning."""
    fd = _flock(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    if fd is None:  # NFS emulates flock with a POSIX lock, which needs an fd open for writing: not a directory's
        fd = _flock(os.path.join(folder, FOLDER_LOCK_FILE), os.O_RDWR | os.O_CREAT)
    if fd is None:
        log.warning(f"{folder}: cannot lock the folder; two writers of one dataset there at once are not kept apart")
        yield
        return
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


def describe_error(error: BaseException) -> str:
    """A write error in one line: an ``OSError`` as Python prints it (``[Errno 28] No space left on
    device``), anything else (safetensors' ``SafetensorError``, ``torch.save``'s ``RuntimeError``) with
    its type, since their text alone may not say what failed."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text if isinstance(error, OSError) else f"{type(error).__name__}: {text}"


def _host() -> str:
    # the host goes into a file name: keep it to characters every filesystem takes
    return re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname()) or "host"


def temp_name(path: str | os.PathLike[str]) -> Path:
    """The temporary name ``path`` is written under: hidden, in the same directory (so the rename stays on
    one filesystem), and per process (two ranks writing the same name never share a temporary file):
    ``.NAME.tmp-HOST-PID``. The host and pid say whose it is when a killed writer leaves it behind."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{_host()}-{os.getpid()}")


def backup_name(path: str | os.PathLike[str]) -> Path:
    """Where an overwrite sets the old file at ``path`` aside until the new one is in place (so that a
    failure can put it back): ``.NAME.old-HOST-PID``, named like :func:`temp_name`."""
    p = Path(path)
    return p.with_name(f".{p.name}.old-{_host()}-{os.getpid()}")


# tmp (a temporary file) or old (a backup), then HOST-PID, or PID alone (the names before the host was added)
_LEFT_SUFFIX = re.compile(r"\.(?P<kind>tmp|old)-(?:(?P<host>[A-Za-z0-9._]+)-)?(?P<pid>[0-9]+)$")


@dataclass(frozen=True)
class Leftover:
    """A temporary file of the final name ``final``, left by a writer that did not finish (or is still
    writing), or (``backup``) the old file at ``final`` that an overwrite set aside and did not get to
    remove or put back (:func:`backup_name`).

    ``host`` is None for a name without one. ``gone``: its writer is known not to be running: it was on
    this host, its pid is not running, or is a process started after the file was last written (a
    backup: renamed) -- the pid was reused, e.g. after a reboot -- and no process holds the ``flock``
    an :class:`AtomicFile` keeps on its temporary file (a writer in another pid namespace with the same
    host name: a container). Anything else (another host sharing the storage, a live pid, no host in the
    name) may still be writing it."""

    path: Path
    size: int
    host: str | None
    pid: int
    gone: bool
    final: Path | None = None
    backup: bool = False

    def describe(self, note: str = "") -> str:
        """``PATH (SIZE, pid P on HOST)`` for a log line or an inspect warning; ``note`` goes inside the
        parentheses, after a comma."""
        return (f"{self.path} ({_size_text(self.size)}, pid {self.pid} on {self.host or 'an unknown host'}"
                f"{', ' + note if note else ''})")


def leftover_temps(path: str | os.PathLike[str]) -> list[Leftover]:
    """The temporary files (:func:`temp_name`) and backups (:func:`backup_name`) of ``path`` in its folder,
    other than this process's own."""
    p = Path(path)
    if not p.parent.is_dir():
        return []
    out = []
    names = (f".{glob.escape(p.name)}.{kind}-*" for kind in ("tmp", "old"))
    for tmp in sorted(t for pattern in names for t in p.parent.glob(pattern)):
        m = _LEFT_SUFFIX.fullmatch(tmp.name[len(p.name) + 1:])
        if m is None or tmp in (temp_name(p), backup_name(p)):
            continue
        try:
            st = tmp.stat()
        except FileNotFoundError:  # its writer committed or removed it meanwhile
            continue
        host, pid, backup = m["host"], int(m["pid"]), m["kind"] == "old"
        # a backup keeps the old file's mtime; its rename (the writer's last act on it) set its ctime
        written = st.st_ctime if backup else st.st_mtime
        gone = host == _host() and not _writer_may_run(pid, written) and not _held(tmp)
        out.append(Leftover(tmp, st.st_size, host, pid, gone, p, backup))
    return out


def _held(path: Path) -> bool:
    """Whether a process holds a ``flock`` on ``path`` (an open :class:`AtomicFile`, whichever pid
    namespace it runs in: the lock belongs to the kernel's open file, not to a pid). False where that
    cannot be told (unreadable, a filesystem without flock): the pid rule decides alone, as it did."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # releases the lock it may have taken
    return False


def _writer_may_run(pid: int, mtime: float) -> bool:
    """Whether process ``pid`` on this host may be the writer of a file last written at ``mtime``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: running
        pass
    started = _start_time(pid)
    return started is None or started <= mtime + 1.0  # 1 s: /proc start times are in clock ticks


def _start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from Linux's /proc; None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        ticks = int(stat.rpartition(")")[2].split()[19])  # field 22, counted after the command name
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _size_text(size: int) -> str:
    value, units = float(size), ["B", "KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value /= 1024
        units.pop(0)
    return f"{size} B" if units[0] == "B" else f"{value:.1f} {units[0]}"


def _remove(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        tmp.unlink()


def _commit(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _open_locked(tmp: Path, mode: str, **open_kwargs: Any) -> IO[Any]:
    """Open ``tmp`` for writing, emptied, holding an exclusive ``flock`` on it until it is closed."""
    # not truncated before the lock is ours: a writer with the same temporary name (the same host name
    # and pid in another pid namespace) may be writing it
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FileExistsError(errno.EEXIST, "another writer holds this temporary file (one with the same host "
                              "name and pid: another container? or an unclosed writer of this process); it was "
                              "left as it is", str(tmp)) from None
    except OSError:  # a filesystem without flock: liveness falls back to the pid in the name
        pass
    try:
        os.ftruncate(fd, 0)
        return open(fd, mode, **open_kwargs)
    except BaseException:
        os.close(fd)
        _remove(tmp)
        raise


def atomic_write(path: str | os.PathLike[str], content: bytes | str | Callable[[Path], Any]) -> Path:
    """Write ``content`` to ``path`` atomically and durably; returns ``path``.

    ``content`` is the file's bytes, its text (UTF-8, written as is: no newline translation), or a callable
    ``write(tmp_path)`` that creates the file at ``tmp_path`` (and closes it). Any exception from writing,
    flushing or syncing propagates unchanged after the temporary file is removed.
    """
    path = Path(path)
    if not callable(content):
        with AtomicFile(path, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else bytes(content))
        return path
    tmp = temp_name(path)
    # not locked as AtomicFile's are: the callable creates and closes the file itself (torch.save,
    # safetensors), so no descriptor of ours is open while it writes; its leftover keeps the pid rule.
    # No dataset file (what leftover_temps is asked about) is written this way.
    try:
        content(tmp)
        fsync_file(tmp)
        _commit(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


class AtomicFile:
    """A file opened under :func:`temp_name` (``mode`` ``"wb"``, ``"w+b"`` or ``"w"``) that only appears under
    ``path`` on :meth:`commit`; :meth:`discard` (or leaving a ``with`` block by an exception) drops it.

    ``AtomicFile(path, "wb").file`` is the open file object; ``with AtomicFile(p) as f: f.write(...)``
    commits when the block ends normally. While open it holds an exclusive ``flock`` on the temporary
    file (what :func:`leftover_temps` checks); a temporary file of the same name another process holds
    locked is refused (``FileExistsError``) without touching it.
    """

    def __init__(self, path: str | os.PathLike[str], mode: str = "wb", **open_kwargs: Any) -> None:
        if mode not in ("wb", "w+b", "w"):  # "w+b": a writer that reads back what it wrote (RecordWriter.patch)
            raise ValueError(f"AtomicFile: mode {mode!r}; expected 'wb', 'w+b' or 'w'")
        self.path = Path(path)
        self.tmp = temp_name(self.path)
        self.file: IO[Any] = _open_locked(self.tmp, mode, **open_kwargs)
        self.done = False
        self.placed = False

    def sync(self) -> None:
        """Flush and fsync what was written (the file stays open)."""
        self.file.flush()
        os.fsync(self.file.fileno())

    def place(self) -> None:
        """Rename the (synced) temporary file into place and fsync the directory; the file stays open,
        and locked, until :meth:`commit`. ``placed`` is set as soon as the rename is done."""
        os.replace(self.tmp, self.path)
        self.placed = True
        fsync_dir(self.path.parent)

    def commit(self) -> Path:
        """Flush, fsync, rename into place (unless :meth:`place` did), fsync the directory, close. On
        failure the temporary file is removed and the exception propagates."""
        if self.done:
            return self.path
        self.done = True
        try:
            if not self.placed:
                self.sync()
                self.place()  # before close: the lock is held until the file has its final name
            self.file.close()
        except BaseException:
            with contextlib.suppress(OSError):
                self.file.close()
            if not self.placed:
                _remove(self.tmp)
            raise
        return self.path

    def discard(self) -> None:
        """Close and remove the temporary file; ``path`` is untouched (once :meth:`place` renamed it there,
        removing it is the caller's: see ``RecordWriter.close``)."""
        if self.done:
            return
        self.done = True
        with contextlib.suppress(OSError):
            self.file.close()
        if not self.placed:
            _remove(self.tmp)

    def __enter__(self) -> IO[Any]:
        return self.file

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


_W = TypeVar("_W", bound="CommitOrAbort")


class CommitOrAbort:
    """A writer of several files used as a context manager: :meth:`close` (which commits them) when the
    block ends normally, :meth:`abort` (nothing appears under the final names) when it raises."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self: _W) -> _W:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
