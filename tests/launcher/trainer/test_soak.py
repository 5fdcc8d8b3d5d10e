"""Issue 9, item 8: a CPU soak run -- 2 ranks under torchrun, evaluation and checkpoints every few
minutes -- with each rank's resident memory (RSS) and open file descriptors sampled: both must stay flat.

20 minutes by default; ``PFC_SOAK_SECONDS`` sets the duration (e.g. 120 for a quick check). Marked
slow: `make test` and `.ci/run` do not run it; run it with
``PFC_SOAK_SECONDS=1200 pytest tests/launcher/trainer/test_soak.py -m slow -s``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.runs import (
    _descendants,
    _pfc,
    _train_args,
    dataset,  # noqa: F401
)

SOAK_SECONDS = float(os.environ.get("PFC_SOAK_SECONDS", "1200"))
MiB = 1024 * 1024


def _ranks(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the training ranks below ``pfc train --nproc-per-node`` (launcher -> torchrun -> ranks).

    Read from /proc (Linux), so the test needs nothing beyond the standard library.
    """
    out: dict[int, int] = {}
    for pid in _descendants(launcher_pid):
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


def plan(rate: float, seconds: float, cycles: int = 5, samples_per_cycle: int = 12) -> tuple[int, int, float]:
    """(train.steps, eval/checkpoint interval, sampling interval in s) for a soak of about ``seconds`` at
    ``rate`` steps/s: ``cycles`` equal evaluation cycles (steps is a multiple of the interval, so the last
    cycle is as long as the others), sampled often enough for ``samples_per_cycle`` samples in each."""
    every = max(10, int(rate * seconds / cycles))
    cycle_s = every / rate
    return every * cycles, every, max(0.2, min(seconds / 240, cycle_s / samples_per_cycle))


def cycle_windows(eval_times: list[float]) -> tuple[tuple[float, float], tuple[float, float]]:
    """The early and the late evaluation cycle to compare: (eval k, eval k+1) with k the second one when there
    are enough (past the warm-up), else the first; and the last full cycle (second-to-last eval to the last)."""
    if len(eval_times) < 3:
        raise ValueError(f"need at least 3 evaluations to compare two cycles, got {len(eval_times)}")
    k = 1 if len(eval_times) >= 4 else 0
    return (eval_times[k], eval_times[k + 1]), (eval_times[-2], eval_times[-1])


def rss_slope_mib_per_hour(samples: list[tuple[float, int, int]], since: float) -> float:
    """Least-squares slope of resident memory (MiB) over time (hours), for samples from ``since`` on."""
    pts = [(t, rss / MiB) for t, rss, _ in samples if t >= since]
    if len(pts) < 2:
        return float("nan")
    mt = sum(t for t, _ in pts) / len(pts)
    mr = sum(r for _, r in pts) / len(pts)
    var = sum((t - mt) ** 2 for t, _ in pts)
    return float("nan") if var == 0 else sum((t - mt) * (r - mr) for t, r in pts) / var * 3600


def test_soak_windows_follow_duration_and_eval_interval():
    """The soak's plan at several durations and machine speeds: equal cycles, enough samples in each
    (the 900 s soak ended with one sample in its last window when the last cycle was short)."""
    for seconds in (60, 120, 900, 1200, 3600):
        for rate in (2.0, 16.0, 60.0):
            steps, every, interval = plan(rate, seconds)
            assert steps % every == 0 and steps // every == 5, (seconds, rate, steps, every)
            cycle_s = every / rate
            assert cycle_s / interval >= 8 or interval == 0.2, (seconds, rate, cycle_s, interval)
    # evaluation times of a run: at every interval and at the last step (the same time here)
    evals = [100.0 * i for i in range(1, 6)]
    early, late = cycle_windows(evals)
    assert early == (200.0, 300.0) and late == (400.0, 500.0)
    with pytest.raises(ValueError, match="at least 3 evaluations"):
        cycle_windows([1.0, 2.0])
    # slope: 10 MiB over 30 minutes is 20 MiB/hour; a flat series is 0
    ss = [(float(t), int((500 + 10 * t / 1800) * MiB), 10) for t in range(0, 1801, 60)]
    assert abs(rss_slope_mib_per_hour(ss, 0.0) - 20.0) < 1e-6
    assert rss_slope_mib_per_hour([(float(t), 500 * MiB, 10) for t in range(10)], 0.0) == 0.0


# The suite-wide 600 s pytest-timeout would end a 20-minute soak; allow its own bound plus set-up.
@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(int(3 * SOAK_SECONDS + 600))
def test_soak_two_ranks_memory_and_fds_stay_flat(dataset, tmp_path):  # noqa: F811
    prefix, val_bin = dataset
    common = {"data.val_bins": [str(val_bin)], "log.every_steps": 50, "checkpoint.keep_last": 2}
    # Calibrate the step rate on this machine (steps 20 -> 100, past the warm-up) so the soak lasts about
    # SOAK_SECONDS; evaluations and saves add a little on top.
    calib = tmp_path / "calib"
    r = _pfc([*_train_args(prefix, calib, **{**common, "log.every_steps": 20, "train.steps": 100,
                                             "checkpoint.every_steps": 1000, "eval.every_steps": 1000}),
              "--nproc-per-node", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    times = {row["step"]: row["time"] for row in map(json.loads, (calib / "metrics.jsonl").read_text().splitlines())
             if "time" in row}
    rate = 80 / (times[100] - times[20])
    # 5 equal evaluation-and-checkpoint cycles (every ~4 min in 20 min), sampled ~12 times each
    steps, every, interval = plan(rate, SOAK_SECONDS)
    out = tmp_path / "soak"
    args = [*_train_args(prefix, out, **common, **{"train.steps": steps, "checkpoint.every_steps": every,
                                                  "eval.every_steps": every}), "--nproc-per-node", "2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.pop("PFC_FAULT", None)
    log_path = tmp_path / "soak.log"
    samples: dict[int, list[tuple[float, int, int]]] = {}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        t0 = time.time()
        try:
            while proc.poll() is None:
                if time.time() - t0 > 3 * SOAK_SECONDS + 300:
                    pytest.fail(f"soak run did not finish within {3 * SOAK_SECONDS + 300:.0f}s")
                now = time.time()  # wall clock, to line samples up with metrics.jsonl's evaluation rows
                for rank, pid in _ranks(proc.pid).items():
                    try:
                        samples.setdefault(rank, []).append((now, *_rss_and_fds(pid)))
                    except (OSError, StopIteration):  # the rank exited between listing and sampling
                        continue
                time.sleep(interval)
        finally:
            if proc.poll() is None:  # torchrun puts each rank in a session of its own: kill them one by one
                for pid in _descendants(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    elapsed = time.time() - t0
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
    # Compare whole evaluation-to-evaluation cycles (each holds the same work: steps, one evaluation,
    # one save): the second cycle (after warm-up; the first with fewer than 4 evaluations) against the
    # last one. A leak shows as a higher peak, and as the slope.
    eval_times = sorted(row["time"] for row in rows if any(k.startswith("val_") for k in row))
    (early_lo, early_hi), (late_lo, _) = cycle_windows(eval_times)
    for rank, ss in sorted(samples.items()):
        assert len(ss) >= 20, f"rank {rank}: only {len(ss)} samples"
        early, late = _window(ss, early_lo, early_hi), _window(ss, late_lo, float("inf"))
        assert len(early) >= 2 and len(late) >= 2, f"rank {rank}: too few samples per cycle ({len(early)}, {len(late)})"
        rss_early, rss_late = max(s[1] for s in early), max(s[1] for s in late)
        fds_early, fds_late = max(s[2] for s in early), max(s[2] for s in late)
        figures[f"rank{rank}"] = {"rss_mib_peak_early_cycle": round(rss_early / MiB, 1),
                                  "rss_mib_peak_last_cycle": round(rss_late / MiB, 1),
                                  "rss_mib_max": round(max(s[1] for s in ss) / MiB, 1),
                                  "fds_max_early_cycle": fds_early, "fds_max_last_cycle": fds_late,
                                  # after the first evaluation (warm-up, first allocations) to the end
                                  "rss_slope_mib_per_hour": round(rss_slope_mib_per_hour(ss, eval_times[0]), 1)}
        assert rss_late <= rss_early * 1.05 + 16 * MiB, f"rank {rank}: RSS grew: {figures}"
        assert fds_late <= fds_early + 2, f"rank {rank}: file descriptors grew: {figures}"
    print("soak figures:", json.dumps(figures))
    (Path(os.environ.get("PFC_SOAK_REPORT", str(tmp_path / "soak.json")))).write_text(json.dumps(figures, indent=2))
