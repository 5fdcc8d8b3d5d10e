"""What a ``pfc data pack`` killed with SIGKILL leaves: its temporary files (``.NAME.tmp-HOST-PID``, a
``.rec`` of up to hundreds of GiB). ``pfc data inspect`` names them with their size; the next pack to the
same prefix removes those whose writer is gone (this host, pid not running or reused since) and keeps,
naming them, those a write on another host or a live process may still be making.

The kill is real: a ``pfc data pack`` child process, SIGKILL-ed while its ``.rec`` grows.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.atomic import temp_name
from data_pipeline.checks import inspect_dataset
from data_pipeline.pack import pack_dataset
from tests.data_pipeline.helpers import make_image_folder

REPO = Path(__file__).resolve().parents[2]
PFC = [sys.executable, "-c", "from launcher.cli import main; main()"]


def _temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp-*"))


def _kill_pack_mid_write(src: Path, prefix: Path) -> tuple[int, list[Path]]:
    """Start ``pfc data pack src prefix``, SIGKILL it once its temporary ``.rec`` holds records; returns
    its pid and the temporary files it left."""
    proc = subprocess.Popen([*PFC, "data", "pack", str(src), str(prefix), "--no-progress", "--workers", "1"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            rec = [t for t in _temps(prefix.parent) if t.name.startswith(f".{prefix.name}.rec.tmp-")]
            if rec and rec[0].stat().st_size > 0:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the pack ended before it was killed; the test did not kill it mid-write"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return proc.pid, _temps(prefix.parent)


def _size_in(warning: str, path: Path) -> float:
    """The size a warning gives for ``path`` (``PATH (12.3 KiB, ...``), in bytes."""
    m = re.search(re.escape(str(path)) + r" \(([0-9.]+) (B|KiB|MiB|GiB),", warning)
    assert m is not None, warning
    return float(m[1]) * 1024 ** ["B", "KiB", "MiB", "GiB"].index(m[2])


def test_sigkilled_pack_leftovers_are_named_by_inspect_and_removed_by_the_next_pack(tmp_path: Path) -> None:
    """(They stayed: nothing removed them or said they were there.)"""
    prefix = tmp_path / "out" / "faces"
    pack_dataset(make_image_folder(tmp_path / "old", n_ids=2, per_id=2, size=(16, 16)), prefix, progress=False)
    src = make_image_folder(tmp_path / "imgs", n_ids=60, per_id=25, size=(64, 64))
    pid, left = _kill_pack_mid_write(src, prefix)
    rec_tmp = [t for t in left if t.name.startswith(".faces.rec.tmp-")]
    assert rec_tmp and all(t.name.endswith(f"-{pid}") for t in left), left

    rep = inspect_dataset(prefix)  # the old dataset is whole; the leftovers are named, with their size
    assert rep["ok"] and rep["num_classes"] == 2
    for t in left:
        assert any(str(t) in w and "the next `pfc data pack` to this prefix removes it" in w
                   for w in rep["warnings"]), (t, rep["warnings"])
    (said,) = [_size_in(w, rec_tmp[0]) for w in rep["warnings"] if str(rec_tmp[0]) in w]
    assert said == pytest.approx(rec_tmp[0].stat().st_size, rel=0.01)

    again = subprocess.run([*PFC, "data", "pack", str(src), str(prefix), "--no-progress"], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    for t in left:
        assert f"removed {t} (" in again.stderr, again.stderr[-2000:]
    assert _temps(prefix.parent) == []
    rep = inspect_dataset(prefix)
    assert rep["ok"] and rep["images"] == 1500 and not rep["warnings"]


def test_leftovers_a_write_may_still_be_making_are_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Real temporary files named for: a writer on another host (shared storage), a live writer on this
    host (started before the file was last written), a live process that cannot be the writer (started
    after it: its pid was reused, as after a reboot). Only the last is removed; the others are named."""
    prefix = tmp_path / "out" / "train"
    prefix.parent.mkdir(parents=True)
    rec = Path(f"{prefix}.rec")
    host_part = temp_name(rec).name.rpartition("-")[0]  # ".train.rec.tmp-HOST"
    remote = prefix.parent / ".train.rec.tmp-otherhost-1"
    remote.write_bytes(b"r" * 10)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        time.sleep(1.5)  # the live writer started well before its file was last written
        live = prefix.parent / f"{host_part}-{writer.pid}"
        live.write_bytes(b"l" * 10)
        reused = prefix.parent / f".property.tmp-{host_part.rpartition('tmp-')[2]}-{writer.pid}"
        reused.write_bytes(b"p" * 10)
        os.utime(reused, (time.time() - 3600, time.time() - 3600))  # written an hour before the pid started
        rep_warnings = inspect_dataset(prefix)["warnings"]
        assert sum("may still be running" in w for w in rep_warnings) == 2, rep_warnings
        assert any(str(reused) in w and "removes it" in w for w in rep_warnings), rep_warnings
        with caplog.at_level(logging.WARNING, logger="data_pipeline.insightface_writer"):
            pack_dataset(make_image_folder(tmp_path / "imgs", n_ids=2, per_id=1, size=(16, 16)), prefix,
                         progress=False)
        assert remote.exists() and live.exists() and not reused.exists()
        text = caplog.text
        assert f"kept {remote} (10 B, pid 1 on otherhost)" in text and f"kept {live} (10 B" in text
        assert f"removed {reused} (10 B" in text
    finally:
        writer.kill()
        writer.wait()


def test_inspect_after_a_killed_first_pack_names_its_leftovers(tmp_path: Path) -> None:
    """The first pack to a prefix SIGKILLed: there is no dataset, and `pfc data inspect` of the prefix (or
    of its folder, for a `train` prefix) says so in one line naming each temporary file it left and that
    its writer is gone (it said only "no such record file")."""
    prefix = tmp_path / "out" / "train"
    src = make_image_folder(tmp_path / "imgs", n_ids=60, per_id=25, size=(64, 64))
    _, left = _kill_pack_mid_write(src, prefix)
    assert left and not Path(f"{prefix}.rec").exists(), left
    for arg in (prefix, prefix.parent):
        r = subprocess.run([*PFC, "data", "inspect", str(arg)], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        (line,) = r.stderr.strip().splitlines()
        assert line.startswith(f"pfc data inspect: {arg}.rec: no such record file"), line
        for t in left:
            assert re.search(re.escape(str(t)) + r" \([0-9.]+ (B|KiB|MiB), pid [0-9]+ on [^,]+, its writer is gone\)",
                             line), (t, line)
        assert "the next `pfc data pack` to this prefix removes those whose writer is gone" in line
