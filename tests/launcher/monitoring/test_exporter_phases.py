"""The step-phase series an exporter creates follow what the run's engine times: under DeepSpeed, whose
gradient reductions are not timed (its engine has no comm timer), there is no ``communication`` phase at all
(absent, not a false 0)."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from launcher.config import MetricsConfig
from launcher.monitoring.exporter import TrainingMetrics
from launcher.monitoring.series import PHASES, measured_phases
from tests.launcher.monitoring.helpers import STEP_SCALARS

PHASE_TOTAL = "pfc_step_phase_seconds_total"


def _phases(m: TrainingMetrics) -> dict[str, float]:
    """The exposition's ``pfc_step_phase_seconds_total`` samples, by phase (what a scrape would read)."""
    text = generate_latest(m.registry).decode()
    return {s.labels["phase"]: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == PHASE_TOTAL}


def _exporter(comm_timed: bool | None) -> TrainingMetrics:
    kw = {} if comm_timed is None else {"comm_timed": comm_timed}
    return TrainingMetrics(MetricsConfig(enabled=True), rank=0, local_rank=0, node=0, world_size=2, **kw)


def _step(m: TrainingMetrics, scalars: dict[str, float]) -> None:
    m.observe_step(1, scalars, images=16, sampled_classes=7, skipped_records=0)


def test_deepspeed_run_exports_no_communication_phase() -> None:
    m = _exporter(False)  # what RunCallbacks passes for DeepSpeedEngine, whose comm timer is None
    assert _phases(m) == {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    # what train_one_step returns under DeepSpeed: every phase but the communication time
    _step(m, {k: v for k, v in STEP_SCALARS.items() if k != "time_comm_s"})
    after = _phases(m)
    assert "communication" not in after
    assert after["backward"] == pytest.approx(STEP_SCALARS["time_backward_s"])
    # a time_comm_s that reaches it anyway (a caller's mistake) makes no series either
    _step(m, STEP_SCALARS)
    assert "communication" not in _phases(m)


@pytest.mark.parametrize("comm_timed", [None, True])
def test_ddp_run_exports_the_communication_phase_from_zero(comm_timed: bool | None) -> None:
    """Unchanged for DDP (the default; its engine times the all-reduce): every phase's counter is born at 0
    and counts each step's time."""
    m = _exporter(comm_timed)
    assert _phases(m) == dict.fromkeys(PHASES.values(), 0.0)
    _step(m, STEP_SCALARS)
    assert _phases(m)["communication"] == pytest.approx(STEP_SCALARS["time_comm_s"])


def test_measured_phases() -> None:
    assert measured_phases(True) == PHASES
    assert measured_phases(False) == {k: v for k, v in PHASES.items() if k != "time_comm_s"}
    assert measured_phases(True) is not PHASES  # a copy: a caller cannot change the module's table
