"""Overwriting a packed dataset when the new write fails: the old dataset must stay whole.

The failures are real, in a child process: a SIGINT delivered while ``InsightFaceWriter.close()`` appends
the identity records (Ctrl-C during the seconds that take for millions of classes), and a file-size limit
(``RLIMIT_FSIZE``, SIGXFSZ ignored) under which the ``.idx``'s last write really fails with EFBIG. The
old dataset is then checked with the project's own reader (``inspect_dataset``, what ``pfc data inspect``
runs), byte for byte, and for leftover temporary files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from data_pipeline.checks import inspect_dataset
from data_pipeline.pack import pack_dataset
from tests.data_pipeline.helpers import make_image_folder

REPO = Path(__file__).resolve().parents[2]


def _old_dataset(tmp_path: Path, name: str) -> tuple[Path, dict[str, bytes]]:
    """A good packed dataset at ``tmp_path/out/name``; returns its prefix and the bytes of its files."""
    src = make_image_folder(tmp_path / "imgs", n_ids=3, per_id=2, size=(16, 16))
    prefix = tmp_path / "out" / name
    pack_dataset(src, prefix, progress=False, workers=1)
    assert inspect_dataset(prefix)["ok"]
    return prefix, _contents(prefix.parent)


def _contents(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def _assert_old_dataset_intact(prefix: Path, before: dict[str, bytes]) -> None:
    after = _contents(prefix.parent)  # hidden names too: a temporary file left behind is a new name
    assert sorted(after) == sorted(before), f"files changed: {sorted(before)} -> {sorted(after)}"
    changed = [name for name in before if after[name] != before[name]]
    assert not changed, f"overwritten by the failed write: {changed}"
    rep = inspect_dataset(prefix)
    assert rep["ok"], (rep["errors"], rep["corrupt"][:2], rep["warnings"])


def _child(code: str) -> subprocess.Popen[str]:
    script = f"import sys\nsys.path.insert(0, {str(REPO)!r})\n" + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_ctrl_c_during_close_keeps_the_old_dataset(tmp_path: Path) -> None:
    """SIGINT while close() writes the identity records: nothing of the new dataset is committed (it was:
    the .rec/.idx replaced the old ones with header record 0 still [0, 0])."""
    prefix, before = _old_dataset(tmp_path, "train")  # MS1M layout: <dir>/property
    # 500k identities make close() take one to two seconds; the signal is sent a moment after the child
    # says it is closing, so that it lands inside close() rather than on the line that printed
    proc = _child(f"""
        import signal
        from data_pipeline.insightface import InsightFaceWriter
        # a child started in the background inherits SIGINT ignored; Ctrl-C must raise here as in a shell
        signal.signal(signal.SIGINT, signal.default_int_handler)
        w = InsightFaceWriter({str(prefix)!r}, image_size=(16, 16))
        for _ in range(500_000):
            w.add_identity([b"x"])
        print("closing", flush=True)
        w.close()
        print("closed", flush=True)
    """)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == "closing\n", (line, proc.stderr.read() if proc.stderr else "")
        time.sleep(0.25)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "closed" not in out, "close() ended before the signal arrived; the test did not interrupt it"
    assert "KeyboardInterrupt" in err and "insightface_writer.py" in err and "in close" in err, err[-2000:]
    _assert_old_dataset_intact(prefix, before)


def test_idx_write_failing_at_close_keeps_the_old_dataset(tmp_path: Path) -> None:
    """The .idx's final write really fails (EFBIG under a file-size limit) in close(): the .rec must not
    already have replaced the old one (it did: a new .rec with the old .idx and the old property)."""
    prefix, before = _old_dataset(tmp_path, "faces")  # PREFIX.property
    # Empty records under 18-digit keys: the .rec takes 8 B per record, the .idx about 24 B per line, so a
    # limit between the two sizes fails only the .idx. 200 lines (~4.7 kB) stay in the text buffer (8 kB)
    # until close() flushes them, so the write that fails is close()'s.
    n, limit = 200, 3000
    proc = _child(f"""
        import errno, resource, signal
        from data_pipeline.recordio import RecordWriter
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        w = RecordWriter({str(prefix) + ".rec"!r}, {str(prefix) + ".idx"!r})
        for k in range({n}):
            w.write(10**17 + k, b"")
        assert w.tell == 8 * {n} <= {limit}
        print("closing", flush=True)
        try:
            w.close()
        except OSError as e:
            print("close failed:", errno.errorcode.get(e.errno), flush=True)
        else:
            print("closed", flush=True)
    """)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert out.splitlines() == ["closing", "close failed: EFBIG"], (out, err[-2000:])
    _assert_old_dataset_intact(prefix, before)


def test_every_state_a_crash_can_leave_is_old_new_or_has_no_property(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Overwriting with ``pfc data pack``: after each rename or removal (each state a crash can leave) the
    folder holds the old dataset, the new one, or files with no property file, which ``inspect`` refuses;
    never old and new files side by side under a property (it did: the new .rec beside the old .idx and
    property, and the new .rec/.idx beside the old property). Nothing fails here: the renames are only
    watched."""
    for name in ("train", "faces"):  # <dir>/property and PREFIX.property
        old_src = make_image_folder(tmp_path / name / "old_imgs", n_ids=3, per_id=2, size=(16, 16), seed=1)
        new_src = make_image_folder(tmp_path / name / "new_imgs", n_ids=4, per_id=3, size=(16, 16), seed=2)
        prefix = tmp_path / name / "out" / name
        prop = prefix.parent / "property" if name == "train" else Path(f"{prefix}.property")
        names = (Path(f"{prefix}.rec"), Path(f"{prefix}.idx"), prop)
        pack_dataset(old_src, prefix, progress=False, workers=1)
        old = tuple(p.read_bytes() for p in names)

        states: list[tuple[bytes | None, ...]] = []

        def watched(real: Callable[..., None], names: tuple[Path, ...] = names,
                    states: list[tuple[bytes | None, ...]] = states) -> Callable[..., None]:
            def call(*args: Any, **kwargs: Any) -> None:
                real(*args, **kwargs)
                states.append(tuple(p.read_bytes() if p.exists() else None for p in names))
            return call

        with monkeypatch.context() as m:
            m.setattr(os, "replace", watched(os.replace))
            m.setattr(os, "unlink", watched(os.unlink))
            pack_dataset(new_src, prefix, progress=False, workers=1)
        new = tuple(p.read_bytes() for p in names)
        assert inspect_dataset(prefix)["ok"] and new != old and states[-1] == new
        for i, state in enumerate(states):
            if state in (old, new):
                continue
            assert state[2] is None, f"{name}: state {i} of {len(states)} mixes files under a property"
            assert not (state[0] == new[0] and state[1] == old[1]), f"{name}: state {i}: new .rec, old .idx"
