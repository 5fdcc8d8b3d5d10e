"""Progress on rank 0: throughput, ETA, loss by component, LR and memory, in one log line per k steps.

Modelled on torchvision's reference ``MetricLogger``: smoothed values over a window, plus a JSON
lines file in the run folder that ``pfc report`` and the tests read (strict JSON: a value that is not a
finite number, the loss of a skipped step, is ``null``; see :mod:`launcher.strict_json`).
"""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

from launcher import strict_json

log = logging.getLogger("pfc")


def setup_logging(rank: int) -> None:
    """Rank 0 logs at INFO; other ranks only warnings, so one terminal shows one progress stream."""
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stdout, force=True)


def memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank: CUDA allocator peak on GPUs, the process's max RSS on CPUs."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def format_eta(seconds: float) -> str:
    """Remaining time as ``H:MM:SS``, with days when longer (``3d 01:00:00``): ``strftime`` of ``gmtime``
    would wrap at 24 hours and show a 25-hour run as ``01:00:00``. Unknown (NaN) shows as ``?``."""
    if not math.isfinite(seconds):
        return "?"
    total = round(max(seconds, 0.0))
    days, rest = divmod(total, 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    clock = f"{h:02d}:{m:02d}:{sec:02d}"
    return f"{days}d {clock}" if days else clock


class SmoothedValue:
    def __init__(self, window: int = 20) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, v: float, n: int = 1) -> None:
        self.values.append(v)
        self.total += v * n
        self.count += n

    @property
    def avg(self) -> float:
        return sum(self.values) / len(self.values) if self.values else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else float("nan")


class ProgressLogger:
    """Rank 0's progress: ``step_time``, the wall time of the last steps (what ``images_per_s`` reads),
    without the evaluations, saves and discrepancy measurements between them (``overhead_s``, which the
    ETA spreads over the steps); ``meters``, values smoothed over the last 20 updates (``loss_avg``);
    ``latest``, values logged as last measured (the discrepancies)."""

    def __init__(self, total_steps: int, global_batch: int, device: torch.device, jsonl: Path | None,
                 enabled: bool) -> None:
        self.total_steps = total_steps
        self.global_batch = global_batch
        self.device = device
        self.enabled = enabled
        self.meters: dict[str, SmoothedValue] = {}
        self.latest: dict[str, float] = {}
        self.step_time = SmoothedValue(window=20)
        self.step_images = SmoothedValue(window=20)  # all ranks' images of each step in step_time's window
        self.overhead_s = 0.0
        self.jsonl = open(jsonl, "a") if (jsonl is not None and enabled) else None  # noqa: SIM115
        self._last = time.perf_counter()
        self.last: dict[str, Any] = {}

    def update(self, **values: float) -> None:
        for k, v in values.items():
            self.meters.setdefault(k, SmoothedValue()).update(float(v))

    def tick(self, images: float | None = None) -> float:
        """A step ended: the time since the last tick (or the last :meth:`not_step_time`) was the step's;
        ``images``, all ranks' images of the step (None: the nominal global batch)."""
        now = time.perf_counter()
        dt = now - self._last
        self._last = now
        self.step_time.update(dt)
        self.step_images.update(self.global_batch if images is None else images)
        return dt

    def not_step_time(self) -> None:
        """The time since the last tick was no step's (an evaluation, a save): kept out of the step time, so
        that images/s is the training's, and counted in ``overhead_s`` for the ETA."""
        now = time.perf_counter()
        self.overhead_s += now - self._last
        self._last = now

    def images_per_s(self) -> float:
        """The images the steps of the window trained on over their time (a step's batch is short by the
        corrupt records skipped on any rank)."""
        avg = self.step_time.avg
        return self.step_images.avg / avg if avg and avg > 0 else float("nan")

    def eta_s(self, step: int) -> float:
        """Seconds until ``total_steps``: the recent step time plus the evaluations' and saves' time so far
        per step, for each step left (a window of steps alone forgets an evaluation 20 steps on)."""
        per_step = self.step_time.avg or 0.0
        if self.step_time.count:
            per_step += self.overhead_s / self.step_time.count
        return (self.total_steps - step) * per_step

    def emit(self, step: int, extra: dict[str, Any] | None = None, quiet: bool = False) -> dict[str, Any]:
        rec: dict[str, Any] = {"step": step, "time": time.time(), "images_per_s": self.images_per_s(),
                               "memory_bytes": memory_bytes(self.device)}
        rec.update({k: m.avg for k, m in self.meters.items()})
        rec.update(self.latest)
        rec.update(extra or {})
        # the newest value of every key (an evaluation's record, emitted after the step's, keeps its loss)
        self.last = {**self.last, **rec}
        if self.enabled and not quiet:
            eta = format_eta(self.eta_s(step))
            losses = "  ".join(f"{k} {v:.4f}" for k, v in rec.items() if k.startswith("loss"))
            log.info(f"step {step}/{self.total_steps}  {rec['images_per_s']:.1f} img/s  eta {eta}  "
                     f"{losses}  lr {rec.get('lr', float('nan')):.5f}  "
                     f"mem {rec['memory_bytes'] / 2**20:.0f} MiB")
        if self.enabled and self.jsonl is not None:
            self.jsonl.write(strict_json.dumps(rec) + "\n")  # a skipped step's NaN loss as null
            self.jsonl.flush()
        return rec

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
