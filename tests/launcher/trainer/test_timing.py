"""PhaseClock's arithmetic on the CPU (launcher/trainer/timing.py), on a scripted host clock: no
sleeps, no timing. Its CUDA events are exercised by tests/gpu/test_step_timing.py on a GPU."""

from __future__ import annotations

import pytest
import torch

from launcher.trainer.step import PHASES
from launcher.trainer.timing import PhaseClock


class _Ticks:
    """A host clock that reads the given times in turn."""

    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


def test_phases_accumulate_and_sum_to_the_timed_intervals() -> None:
    # data 0..2 (host) + 2..3 (device), forward 3..7, backward 7..12, data again 12..12.5, optimizer 13..16
    ticks = _Ticks(0.0, 2.0, 2.0, 3.0, 3.0, 7.0, 7.0, 12.0, 12.0, 12.5, 13.0, 16.0)
    clock = PhaseClock(torch.device("cpu"), PHASES, clock=ticks)
    with clock.host("data"):
        pass
    for phase in ("data", "forward", "backward"):
        with clock.device(phase):  # on the CPU: the host clock
            pass
    with clock.host("data"):
        pass
    with clock.device("optimizer"):
        pass
    assert not ticks.times  # every boundary read the clock once
    got = clock.seconds()
    assert got == {"data": 3.5, "forward": 4.0, "backward": 5.0, "optimizer": 3.0}
    assert sum(got.values()) == 15.5  # the intervals' total: 16 - 0 minus the untimed 12.5..13
    assert clock.seconds() == got  # reading does not change it


def test_a_phase_never_entered_reads_zero() -> None:
    clock = PhaseClock(torch.device("cpu"), PHASES, clock=_Ticks(1.0, 1.25))
    with clock.device("forward"):
        pass
    assert clock.seconds() == {"data": 0.0, "forward": 0.25, "backward": 0.0, "optimizer": 0.0}


@pytest.mark.parametrize("kind", ["host", "device"])
def test_an_unknown_phase_raises(kind: str) -> None:
    clock = PhaseClock(torch.device("cpu"), PHASES, clock=_Ticks(0.0, 1.0))
    with pytest.raises(KeyError, match="comm"), getattr(clock, kind)("comm"):
        pass
    assert clock.seconds() == dict.fromkeys(PHASES, 0.0)


def test_the_step_reports_every_phase() -> None:
    """The step's scalars carry ``time_<phase>_s`` for each of the clock's phases (what the exporter and
    metrics.jsonl read), plus the engine's communication time."""
    from launcher.monitoring.series import PHASES as EXPORTED

    assert {f"time_{p}_s" for p in PHASES} | {"time_comm_s"} == set(EXPORTED)
