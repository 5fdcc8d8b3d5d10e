"""Issue 9, item 8: a CPU soak run -- 2 ranks under torchrun, evaluation and checkpoints every few
minutes -- with each rank's resident memory (RSS) and open file descriptors sampled: both must stay flat.

20 minutes by default; ``PFC_SOAK_SECONDS`` sets the duration (e.g. 120 for a quick check). Marked
slow: `make test` and `.ci/run` do not run it; run it with
``PFC_SOAK_SECONDS=1200 pytest tests/launcher/test_soak.py -m slow -s``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launcher.test_reliability import _pfc, _train_args
from tests.launcher.test_training import dataset  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

SOAK_SECONDS = float(os.environ.get("PFC_SOAK_SECONDS", "1200"))
MiB = 1024 * 1024


def _ranks(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the training ranks below ``pfc train --nproc-per-node`` (launcher -> torchrun -> ranks).

    Read from /proc (Linux), so the test needs nothing beyond the standard library.
    """
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:  # field 4 of stat is the parent pid; the command name (field 2) may hold spaces
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    below, frontier = set(), {launcher_pid}
    while frontier:
        frontier = {pid for pid, pp in parent.items() if pp in frontier} - below
        below |= frontier
    out: dict[int, int] = {}
    for pid in below:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = dict(e.split(b"=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if b"launcher.cli" in cmd and b"RANK" in env:
            out[int(env[b"RANK"])] = pid
    return out


def _rss_and_fds(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    return rss_kib * 1024, len(os.listdir(f"/proc/{pid}/fd"))


def _window(samples: list[tuple[float, int, int]], lo: float, hi: float) -> list[tuple[float, int, int]]:
    return [s for s in samples if lo <= s[0] < hi]


def test_soak_two_ranks_memory_and_fds_stay_flat(dataset, tmp_path):  # noqa: F811
    prefix, val_bin = dataset
    common = {"data.val_bins": [str(val_bin)], "log.every_steps": 50, "checkpoint.keep_last": 2}
    # Calibrate the step rate on this machine (steps 10 -> 40, past the warm-up) so the soak lasts about
    # SOAK_SECONDS; evaluations and saves add a little on top.
    calib = tmp_path / "calib"
    r = _pfc([*_train_args(prefix, calib, **{**common, "log.every_steps": 10, "train.steps": 40,
                                             "checkpoint.every_steps": 1000, "eval.every_steps": 1000}),
              "--nproc-per-node", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    times = {row["step"]: row["time"] for row in map(json.loads, (calib / "metrics.jsonl").read_text().splitlines())
             if "time" in row}
    rate = 30 / (times[40] - times[10])
    steps = max(60, int(rate * SOAK_SECONDS))
    every = max(10, steps // 5)  # about 5 evaluations and 5 checkpoints: every ~4 min in 20 min
    out = tmp_path / "soak"
    args = [*_train_args(prefix, out, **common, **{"train.steps": steps, "checkpoint.every_steps": every,
                                                  "eval.every_steps": every}), "--nproc-per-node", "2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.pop("PFC_FAULT", None)
    log_path = tmp_path / "soak.log"
    interval = max(1.0, SOAK_SECONDS / 60)
    samples: dict[int, list[tuple[float, int, int]]] = {}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        t0 = time.monotonic()
        try:
            while proc.poll() is None:
                if time.monotonic() - t0 > 3 * SOAK_SECONDS + 300:
                    pytest.fail(f"soak run did not finish within {3 * SOAK_SECONDS + 300:.0f}s")
                now = time.monotonic() - t0
                for rank, pid in _ranks(proc.pid).items():
                    try:
                        samples.setdefault(rank, []).append((now, *_rss_and_fds(pid)))
                    except (OSError, StopIteration):  # the rank exited between listing and sampling
                        continue
                time.sleep(interval)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
            proc.wait()
    elapsed = time.monotonic() - t0
    text = log_path.read_text()
    assert proc.returncode == 0, text[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = sum(1 for row in rows if any(k.startswith("val_") for k in row))
    saves = text.count(" written in ")
    assert evals >= 4 and saves >= 4, (evals, saves)
    assert sorted(samples) == [0, 1], f"sampled ranks {sorted(samples)}"
    figures = {"seconds": round(elapsed), "steps": steps, "evaluations": evals, "checkpoints": saves,
               "samples_per_rank": min(len(v) for v in samples.values())}
    for rank, ss in sorted(samples.items()):
        assert len(ss) >= 20, f"rank {rank}: only {len(ss)} samples"
        end = ss[-1][0]
        # after warm-up (first evaluation and save done) vs the last quarter of the run
        early, late = _window(ss, 0.25 * end, 0.5 * end), _window(ss, 0.75 * end, end + 1)
        rss_early = statistics.median(s[1] for s in early)
        rss_late_max = max(s[1] for s in late)
        fds_early, fds_late = max(s[2] for s in early), max(s[2] for s in late)
        figures[f"rank{rank}"] = {"rss_mib_after_warmup": round(rss_early / MiB, 1),
                                  "rss_mib_max_last_quarter": round(rss_late_max / MiB, 1),
                                  "rss_mib_max": round(max(s[1] for s in ss) / MiB, 1),
                                  "fds_after_warmup_max": fds_early, "fds_last_quarter_max": fds_late}
        assert rss_late_max <= rss_early * 1.05 + 32 * MiB, f"rank {rank}: RSS grew: {figures}"
        assert fds_late <= fds_early + 2, f"rank {rank}: file descriptors grew: {figures}"
    print("soak figures:", json.dumps(figures))
    (Path(os.environ.get("PFC_SOAK_REPORT", str(tmp_path / "soak.json")))).write_text(json.dumps(figures, indent=2))
