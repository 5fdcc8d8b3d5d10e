"""Issue 13, item 9: the progress ETA does not wrap at 24 hours."""

from __future__ import annotations

import logging

import pytest
import torch

from launcher.trainer.progress import ProgressLogger


@pytest.mark.parametrize("seconds, text", [
    (0, "00:00:00"), (59.6, "00:01:00"), (3600, "01:00:00"), (86399, "23:59:59"),
    (90000, "1d 01:00:00"), (3 * 86400 + 61, "3d 00:01:01"), (-5, "00:00:00"), (float("nan"), "?"),
])
def test_format_eta(seconds, text):
    from launcher.trainer.progress import format_eta

    assert format_eta(seconds) == text


def test_logged_eta_of_a_25_hour_remainder(caplog):
    p = ProgressLogger(total_steps=1000, global_batch=8, device=torch.device("cpu"), jsonl=None, enabled=True)
    for _ in range(3):
        p.step_time.update(100.0)  # 100 s per step, 900 steps left: 25 hours
    with caplog.at_level(logging.INFO, logger="pfc"):
        p.emit(100)
    line = next(r.getMessage() for r in caplog.records if "eta" in r.getMessage())
    assert "eta 1d 01:00:00" in line, line
