"""Times of a training step that are true on the device that ran it: the step's phases (:class:`PhaseClock`)
and DDP's gradient all-reduce (:class:`CommTimer`, with its comm hook :func:`timed_allreduce_hook`).

CUDA is asynchronous: an operation returns to the host once its kernel is queued, long before it has
run. Host timestamps (``time.perf_counter``) around a phase then measure how long the host took to
*queue* it, and all the queued work lands in whichever phase first waits for a result (a ``.cpu()``, a
``float()``): on a GPU the forward and backward looked free and the optimizer phase held the step. On a
CUDA device the clock therefore records CUDA events on the device's current stream at the phase
boundaries and reads their elapsed times once the step's work is done (:meth:`PhaseClock.seconds`). On
the CPU an operation returns when it is done, so host timestamps are already the truth and are kept.

Some of a step's time is a wait of the host itself, with the device idle: the data loader producing the
next batch. That is timed on the host on every device (:meth:`PhaseClock.host`) and added to its phase.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist


class PhaseClock:
    """Accumulated seconds per named phase of one step; a phase may be entered many times (per micro-batch).

    ``device``: where the step runs (CUDA: device phases are timed with CUDA events; anything else: on the
    host). ``phases``: the phase names; entering any other name raises ``KeyError`` (a typo would
    otherwise open a phase nobody reads). ``clock``: the host clock (seconds), ``time.perf_counter``.

    Every CUDA event is recorded on the device's current stream, which the step does not change: once the
    last one has completed, all have, so :meth:`seconds` waits on that one only.
    """

    def __init__(self, device: torch.device, phases: Sequence[str],
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self._cuda = device if device.type == "cuda" else None  # the device whose stream the events go on
        self.phases = tuple(phases)
        self._clock = clock
        self._host = dict.fromkeys(self.phases, 0.0)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def _check(self, phase: str) -> None:
        if phase not in self._host:
            raise KeyError(f"unknown phase {phase!r} (this clock times {', '.join(self.phases)})")

    @contextlib.contextmanager
    def host(self, phase: str) -> Iterator[None]:
        """Time the block on the host, on every device: for waits of the host (the data loader)."""
        self._check(phase)
        t0 = self._clock()
        yield
        self._host[phase] += self._clock() - t0

    @contextlib.contextmanager
    def device(self, phase: str) -> Iterator[None]:
        """Time the work the block gives the device: CUDA events around it on CUDA, the host clock elsewhere."""
        if self._cuda is None:
            with self.host(phase):
                yield
            return
        self._check(phase)
        stream = torch.cuda.current_stream(self._cuda)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        yield
        end.record(stream)
        self._events.append((phase, start, end))

    def seconds(self) -> dict[str, float]:
        """Seconds per phase (every phase, 0 for one never entered). On CUDA this waits for the last event
        recorded (one ``event.synchronize()``): call it after the step's work has been queued."""
        out = dict(self._host)
        if self._events:
            self._events[-1][2].synchronize()
            for phase, start, end in self._events:
                out[phase] += start.elapsed_time(end) / 1000.0  # milliseconds
        return out


class CommTimer:
    """Seconds the backbone's gradient all-reduces took, each from its launch to its completion (they
    overlap the backward), summed over the step's buckets and read by :meth:`take`.

    gloo runs a collective on the host, so host timestamps at the launch and in the completion callback
    time it. NCCL runs it on its own CUDA stream, asynchronously: the callback runs as soon as the
    collective is queued, and host timestamps would time only its launch. For tensors on a CUDA device
    the hook therefore records CUDA events instead: one on the launching stream before the all-reduce, and
    one in the completion callback, on the stream torch runs a CUDA future's callbacks on, which waits for
    the all-reduce first. They are read in :meth:`take`, after the step has waited for its work (DDP's
    backward ends by waiting for the all-reduces' results, and the step's agreement waits for that)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self, device: torch.device) -> float | torch.cuda.Event:
        """A mark at the launch of a collective on tensors of ``device``."""
        if device.type != "cuda":
            return time.perf_counter()
        start = torch.cuda.Event(enable_timing=True)
        start.record(torch.cuda.current_stream(device))
        return start

    def stop(self, mark: float | torch.cuda.Event, device: torch.device) -> None:
        """In the collective's completion callback: the time since ``mark`` counts (on CUDA when read)."""
        if isinstance(mark, float):
            self.seconds += time.perf_counter() - mark
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(device))  # the callback's stream: after the collective
        self._events.append((mark, end))

    def take(self) -> float:
        """The seconds since the last take, and start again from 0."""
        s, self.seconds = self.seconds, 0.0
        events, self._events = self._events, []
        for start, end in events:
            end.synchronize()  # already complete after the step's wait: no time lost here
            s += start.elapsed_time(end) / 1000.0  # milliseconds
        return s


def timed_allreduce_hook(state: CommTimer, bucket):  # type: ignore[no-untyped-def]
    """DDP's default averaging all-reduce, timed from launch to completion (:class:`CommTimer`).

    (Unannotated on purpose: DDP checks the hook's annotations against real classes, and postponed
    annotations are strings.)"""
    buf = bucket.buffer()
    mark = state.start(buf.device)
    group = dist.group.WORLD
    buf.div_(dist.get_world_size(group))
    fut = dist.all_reduce(buf, group=group, async_op=True).get_future()

    def done(f: torch.futures.Future[Any]) -> torch.Tensor:
        state.stop(mark, buf.device)
        return f.value()[0]

    return fut.then(done)
