"""Whether a leftover's writer is gone, across pid namespaces: the ``flock`` an ``AtomicFile`` holds.

Two containers with the same host name (Docker ``--network host``, one ``hostname:`` in compose) have
separate pid namespaces: a temporary file named ``.NAME.tmp-HOST-PID`` by one names a pid that, in the
other, is not running (or is another process). The pid rule alone judged such a live writer's file
"gone", and the next pack in the other container removed it. An ``AtomicFile`` now holds an exclusive
``flock`` on its temporary file while it is open (the kernel's lock on the open file, seen from every
namespace): a leftover is gone only when no process holds it. The writers here are real processes: one
in a new pid namespace (``unshare``), one holding a file named for a dead pid, one with the same
temporary name as ours.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from data_pipeline.atomic import AtomicFile, leftover_temps, temp_name
from data_pipeline.insightface import InsightFaceWriter

REPO = Path(__file__).resolve().parents[2]


def _write(prefix: Path) -> None:
    with InsightFaceWriter(prefix, image_size=(16, 16)) as w:
        w.add_identity([b"img"])


def _wait_gone(rec: Path, tmp: Path) -> None:
    """Wait until the writer of ``tmp`` is judged gone (its process and its lock went with the kill)."""
    deadline = time.monotonic() + 30
    while not [t for t in leftover_temps(rec) if t.path == tmp and t.gone]:
        assert time.monotonic() < deadline, leftover_temps(rec)
        time.sleep(0.05)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


_NS_WRITER = """
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from data_pipeline.atomic import AtomicFile
    while True:  # pid 1 of the new namespace: fork until the writer's pid is one not running outside it
        pid = os.fork()
        if pid == 0:
            if os.path.exists(f"/proc/{{os.getpid()}}"):  # /proc is still the outer namespace's
                os._exit(3)
            f = AtomicFile({rec!r})
            f.file.write(b"w" * 1000)
            f.file.flush()
            print(f.tmp, flush=True)
            time.sleep(300)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 3:
            break
"""


def test_a_writer_in_another_pid_namespace_keeps_its_temporary_file(tmp_path: Path) -> None:
    """A live AtomicFile writer in another pid namespace, same host name: its temporary file names a pid
    that is not running here. The next pack keeps it (it removed it); once the writer is killed, the next
    pack removes it."""
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare or "unshare", "--pid", "--fork", "--kill-child", "true"], capture_output=True)
    if unshare is None or probe.returncode != 0:
        pytest.skip(f"cannot make a pid namespace here (unshare: {probe.stderr.decode().strip()[:200]})")
    prefix = tmp_path / "out" / "faces"
    prefix.parent.mkdir()
    rec = Path(f"{prefix}.rec")
    code = textwrap.dedent(_NS_WRITER.format(repo=str(REPO), rec=str(rec)))
    proc = subprocess.Popen([unshare, "--pid", "--fork", "--kill-child", sys.executable, "-c", code],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        tmp = Path(proc.stdout.readline().strip())
        assert tmp.parent == rec.parent and tmp.stat().st_size == 1000, proc.stderr.read() if proc.stderr else ""
        (left,) = leftover_temps(rec)
        assert not Path(f"/proc/{left.pid}").exists()  # the pid in its name: not running here
        assert left.path == tmp and not left.gone, left
        _write(prefix)
        assert tmp.read_bytes() == b"w" * 1000  # kept, untouched, while its writer runs
    finally:
        proc.send_signal(signal.SIGKILL)  # unshare's --kill-child takes the namespace's pid 1, and so all in it
        proc.wait()
    _wait_gone(rec, tmp)
    _write(prefix)
    assert not tmp.exists()


def test_a_leftover_held_by_a_live_process_is_kept_whatever_its_pid(tmp_path: Path) -> None:
    """A temporary file named for a pid that is dead here, held open and locked by a live process (what a
    writer in another namespace looks like from this one): kept by the next pack, removed after it dies."""
    prefix = tmp_path / "out" / "train"
    prefix.parent.mkdir()
    rec = Path(f"{prefix}.rec")
    tmp = temp_name(rec).with_name(f"{temp_name(rec).name.rpartition('-')[0]}-{_dead_pid()}")
    tmp.write_bytes(b"h" * 10)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"f = open({str(tmp)!r}, 'rb'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "print('held', flush=True); time.sleep(300)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        (left,) = leftover_temps(rec)
        assert not left.gone, left
        _write(prefix)
        assert tmp.read_bytes() == b"h" * 10
    finally:
        holder.kill()
        holder.wait()
    _wait_gone(rec, tmp)
    _write(prefix)
    assert not tmp.exists()


def test_a_temporary_file_another_writer_holds_is_refused_untouched(tmp_path: Path) -> None:
    """Another process writes our very temporary name (same host name and pid, another namespace): our
    writer refuses, naming it, and leaves its content as it is (it truncated it and wrote over it)."""
    path = tmp_path / "faces.rec"
    tmp = temp_name(path)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, time\n"
                               f"f = open({str(tmp)!r}, 'wb'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "f.write(b'theirs'); f.flush(); print('held', flush=True); time.sleep(300)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(FileExistsError, match="another writer holds this temporary file"):
            AtomicFile(path)
        assert tmp.read_bytes() == b"theirs" and not path.exists()
    finally:
        holder.kill()
        holder.wait()
    with AtomicFile(path) as f:  # its writer gone, the name is ours again
        f.write(b"ours")
    assert path.read_bytes() == b"ours" and not tmp.exists()
    assert os.listdir(tmp_path) == ["faces.rec"]
