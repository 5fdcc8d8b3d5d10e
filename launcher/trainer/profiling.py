"""A torch.profiler record of some training steps, for `pfc bench train --profile DIR`.

The benchmark runs the ordinary trainer under torchrun, so it asks for the profile through the environment
its ranks inherit: ``PFC_PROFILE_DIR`` (where each rank writes ``profile_rank{r}.txt`` and
``trace_rank{r}.json``) and ``PFC_PROFILE_STEPS`` (``first:last``, the steps recorded, both included; each
with the callbacks after it: its log line, metrics, and an evaluation or checkpoint when one falls on it).
Unset, :func:`step_profiler` returns None and the loop runs as it always does.

The table says where a step's time goes on the host and on the device; its header gives the recorded
steps' wall time and how much of it the device spent in kernels and copies (the device is idle for the
rest: waiting for the host to queue work, or for a synchronisation).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType

DIR_ENV = "PFC_PROFILE_DIR"
STEPS_ENV = "PFC_PROFILE_STEPS"


class StepProfiler:
    """Starts before step ``first`` and stops (writing the table and trace) after step ``last``."""

    def __init__(self, out: Path, first: int, last: int, rank: int, device: torch.device) -> None:
        self.out, self.first, self.last, self.rank, self.device = out, first, last, rank, device
        self._prof: Any = None
        self._t0 = 0.0

    def before(self, step: int) -> None:
        if step == self.first and self._prof is None:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._prof = profile(activities=acts)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._t0 = time.perf_counter()
            self._prof.start()

    def after(self, step: int) -> None:
        if step != self.last or self._prof is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self._t0
        self._prof.stop()
        self._write(wall, self.last - self.first + 1)
        self._prof = None

    def _write(self, wall: float, steps: int) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        events = self._prof.key_averages()
        cuda = self.device.type == "cuda"
        # The kernels' and copies' own rows (device_type CUDA): an operator's row repeats its kernels' time.
        busy_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) if cuda else 0.0
        parts = [f"# pfc bench train profile, rank {self.rank}, steps {self.first}..{self.last} "
                 f"(times inflated by the profiler)", f"# wall {wall * 1e3 / steps:.2f} ms per step"]
        if cuda:
            parts[-1] += (f"; device busy {busy_us / 1e3 / steps:.2f} ms per step ({busy_us / 1e6 / wall:.0%} of the "
                          "wall time)")
        for sort in (["self_cuda_time_total"] if cuda else []) + ["self_cpu_time_total", "cpu_time_total"]:
            parts += [f"# sorted by {sort}", events.table(sort_by=sort, row_limit=40, max_name_column_width=70)]
        (self.out / f"profile_rank{self.rank}.txt").write_text("\n".join(parts) + "\n")
        self._prof.export_chrome_trace(str(self.out / f"trace_rank{self.rank}.json"))


def step_profiler(rank: int, device: torch.device) -> StepProfiler | None:
    """The profiler the environment asks for (see the module docstring), or None."""
    out = os.environ.get(DIR_ENV)
    if not out:
        return None
    spec = os.environ.get(STEPS_ENV, "")
    try:
        first, last = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"{STEPS_ENV}={spec!r}: expected first:last, two step numbers") from None
    if not 1 <= first <= last:
        raise ValueError(f"{STEPS_ENV}={spec!r}: expected 1 <= first <= last")
    return StepProfiler(Path(out), first, last, rank, device)
