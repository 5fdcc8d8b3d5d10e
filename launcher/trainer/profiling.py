"""A torch.profiler record of some training steps, for `pfc bench train --profile DIR`.

The benchmark runs the ordinary trainer under torchrun, so it asks for the profile through the environment
its ranks inherit (:func:`profile_environment`): ``PFC_PROFILE_DIR`` (where each rank writes
``profile_rank{r}.txt`` and ``trace_rank{r}.json``) and ``PFC_PROFILE_STEPS`` (``first:last``, the steps
recorded, both included; each with the callbacks after it: its log line, metrics, and an evaluation or
checkpoint when one falls on it). Unset, :func:`step_profiler` returns None and the loop runs as it always does.

The table's header says which steps it holds, their wall time per step, and on a GPU for how much of it the
device was running kernels or copies (the union of their intervals; the device is idle for the rest, waiting
for the host to queue work or for a synchronisation).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType

DIR_ENV = "PFC_PROFILE_DIR"
STEPS_ENV = "PFC_PROFILE_STEPS"


def device_busy_us(events: Any) -> float:
    """Microseconds in which at least one kernel, copy or fill ran: the union of the device events' intervals
    (a sum would count twice what overlaps, such as NCCL's stream beside the compute stream, and the
    optimizers' annotation rows, which span kernels already counted)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
    busy, cur_start, cur_end = 0.0, None, None
    for start, end in spans:
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return busy + (cur_end - cur_start if cur_end is not None else 0.0)


class StepProfiler:
    """Records the steps ``first`` to ``last`` that the loop reaches; :meth:`close` (after the loop) writes
    what was recorded also when a stop signal ended the run before ``last``, and says which steps that was."""

    def __init__(self, out: Path, first: int, last: int, rank: int, device: torch.device) -> None:
        self.out, self.first, self.last, self.rank, self.device = out, first, last, rank, device
        self._prof: Any = None
        self._t0 = 0.0
        self._steps: list[int] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before(self, step: int) -> None:
        if self._prof is None and not self._steps and self.first <= step <= self.last:  # a resume may start inside
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._prof = profile(activities=acts)
            self._sync()
            self._prof.start()
            self._t0 = time.perf_counter()  # after start(): the profiler's own start-up is not a step's time

    def after(self, step: int) -> None:
        if self._prof is not None:
            self._steps.append(step)
            if step >= self.last:
                self.close()

    def abandon(self) -> None:
        """Stop recording without writing (the run is failing: no device sync, no files, no new error)."""
        prof, self._prof = self._prof, None
        if prof is not None:
            with contextlib.suppress(Exception):
                prof.stop()

    def close(self) -> None:
        if self._prof is None:
            return
        self._sync()
        wall = time.perf_counter() - self._t0
        prof, self._prof = self._prof, None
        prof.stop()
        if self._steps:
            self._write(prof, wall)

    def _write(self, prof: Any, wall: float) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        n, cuda = len(self._steps), self.device.type == "cuda"
        first, last = self._steps[0], self._steps[-1]
        short = "" if last >= self.last else f" (asked for {self.first}..{self.last}: the run ended before)"
        parts = [f"# pfc bench train profile, rank {self.rank}, steps {first}..{last}{short} "
                 "(times inflated by the profiler)", f"# wall {wall * 1e3 / n:.2f} ms per step"]
        if cuda:
            busy = device_busy_us(prof.events())
            parts[-1] += f"; device busy {busy / 1e3 / n:.2f} ms per step ({busy / 1e6 / wall:.0%} of the wall time)"
        events = prof.key_averages()
        for sort in (["self_device_time_total"] if cuda else []) + ["self_cpu_time_total", "cpu_time_total"]:
            parts += [f"# sorted by {sort}", events.table(sort_by=sort, row_limit=40, max_name_column_width=70)]
        (self.out / f"profile_rank{self.rank}.txt").write_text("\n".join(parts) + "\n")
        prof.export_chrome_trace(str(self.out / f"trace_rank{self.rank}.json"))


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


@contextlib.contextmanager
def profile_environment(out: Path | None, first: int, last: int) -> Iterator[None]:
    """The environment a run's ranks inherit: asking for steps ``first..last`` into ``out``, or (``out`` None)
    for no profile, also when the caller's shell exported the variables; restored afterwards."""
    saved = {k: os.environ.get(k) for k in (DIR_ENV, STEPS_ENV)}
    for k in saved:
        os.environ.pop(k, None)
    if out is not None:
        os.environ[DIR_ENV] = str(out.resolve())
        os.environ[STEPS_ENV] = f"{first}:{last}"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
