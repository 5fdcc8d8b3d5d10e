"""Two overwrites of one dataset at once (two ``pfc data pack`` into one output): the folder lock.

Writer A is a real process stopped inside its swap, after its new ``.rec`` is in place and before its
``.idx`` is (a pause hook on its own renames: the only way to land the timing; the files, the processes
and the lock are real). Writer B, another real process, overwrites the same dataset meanwhile. Without
the lock B set A's new ``.rec`` aside, placed its own pair and property, and A then put its ``.idx`` and
property over B's: B's ``.rec`` with A's ``.idx``. With it, B waits for A's renames and its dataset
replaces A's whole.

The ``nfs`` case runs both writers with ``flock`` failing on directories (EBADF), as NFS's emulation of it
does (an NFS server cannot be had here): the lock is then the folder's lock file, and holds the same.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from data_pipeline.atomic import FOLDER_LOCK_FILE
from data_pipeline.checks import inspect_dataset
from data_pipeline.insightface import InsightFaceReader, InsightFaceWriter

REPO = Path(__file__).resolve().parents[2]

_WRITER = """
    import sys
    sys.path.insert(0, {repo!r})
    from data_pipeline import record_writer
    from data_pipeline.insightface import InsightFaceWriter
    if {nfs}:
        import errno, fcntl, os, stat
        real_flock = fcntl.flock
        def nfs_flock(fd, op):
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(errno.EBADF, "Bad file descriptor")
            return real_flock(fd, op)
        fcntl.flock = nfs_flock
    if {pause}:
        place = record_writer._Swap.place
        def paused(self, f):
            if len(self.placing) == 1:  # the .rec is in place, the .idx not yet
                print("paused", flush=True)
                sys.stdin.readline()
            place(self, f)
        record_writer._Swap.place = paused
    with InsightFaceWriter({prefix!r}, image_size=({size}, {size})) as w:
        for c in range({classes}):
            w.add_identity([bytes([c]) * (100 + 37 * i) for i in range(c + 2)])
    print("done", flush=True)
"""


def _writer(prefix: Path, classes: int, size: int, pause: bool, nfs: bool) -> subprocess.Popen[str]:
    code = textwrap.dedent(_WRITER.format(repo=str(REPO), prefix=str(prefix), classes=classes, size=size,
                                          pause=pause, nfs=nfs))
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("nfs", [False, True], ids=["local", "nfs"])
def test_an_overwrite_during_another_ones_swap_leaves_one_whole_dataset(tmp_path: Path, nfs: bool) -> None:
    prefix = tmp_path / "out" / "train"
    with InsightFaceWriter(prefix, image_size=(8, 8)) as w:  # the dataset both overwrite
        w.add_identity([b"old"])
    a = _writer(prefix, classes=3, size=16, pause=True, nfs=nfs)
    b = None
    try:
        assert a.stdout is not None and a.stdin is not None
        assert a.stdout.readline() == "paused\n", a.stderr.read() if a.stderr else ""
        b = _writer(prefix, classes=5, size=24, pause=False, nfs=nfs)
        with contextlib.suppress(subprocess.TimeoutExpired):  # without the lock B finishes now; with it, it waits
            b.wait(timeout=5)
        a.stdin.write("\n")
        a.stdin.flush()
        assert a.wait(timeout=60) == 0, a.stderr.read() if a.stderr else ""
        assert b.wait(timeout=60) == 0, b.stderr.read() if b.stderr else ""
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    report = inspect_dataset(prefix)
    assert report["errors"] == [] and report["corrupt"] == [], report
    reader = InsightFaceReader(prefix)
    # whichever finished last, its .rec, .idx and property together: B's here (A held the folder first)
    assert (reader.num_classes, reader.image_size) == (5, (24, 24))
    assert reader.labels.tolist() == [c for c in range(5) for _ in range(c + 2)]
    assert [len(reader.read_image(k)[1]) for k in reader.image_keys[:3]] == [100, 137, 100]
    lock = [FOLDER_LOCK_FILE] if nfs else []  # a lock file only where the folder cannot be locked
    assert sorted(p.name for p in prefix.parent.iterdir()) == [*lock, "property", "train.idx", "train.rec"]
