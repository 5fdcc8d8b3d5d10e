"""Every JSON file the project writes is strict JSON: a real `pfc train` whose last two steps are non-finite
(``PFC_FAULT=nan:5+``) writes ``metrics.jsonl`` and ``summary.json`` that a strict parser (jq, JavaScript's
``JSON.parse``: no ``NaN`` token) reads, the non-finite loss as ``null``; `pfc report` still plots the run
and its ``--json`` is strict too; a study's JSON with a NaN measurement is strict."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from tests.support.runs import _pfc, _train_args

STEPS = 6
FIRST_BAD = 5


def _refuse(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def strict_loads(text: str) -> Any:
    """``json.loads`` as a strict parser reads: the ``NaN``/``Infinity`` tokens refused."""
    return json.loads(text, parse_constant=_refuse)


@pytest.fixture(scope="module")
def bad_run(dataset, tmp_path_factory) -> Path:
    """A real run of ``STEPS`` steps, every step logged, the steps from ``FIRST_BAD`` on non-finite (skipped)."""
    prefix, val_bin = dataset
    out = tmp_path_factory.mktemp("strict") / "run"
    # keep_best ranks by TAR at FAR 1e-4, undefined (NaN) on a set of 200 impostor pairs: best.json's value
    # (a save at step 3: none is made while steps are being skipped)
    r = _pfc(_train_args(prefix, out, **{"train.steps": STEPS, "checkpoint.every_steps": 3,
                                         "log.every_steps": 1, "data.val_bins": [str(val_bin)],
                                         "eval.every_steps": 3, "checkpoint.keep_best": "tar@1e-4"}),
             fault=f"nan:{FIRST_BAD}+")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"step {FIRST_BAD}: non-finite loss" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    return out


@pytest.mark.multiprocess
def test_metrics_jsonl_is_strict_with_the_skipped_steps_loss_null_and_report_plots_it(bad_run, tmp_path):
    from launcher.monitoring.plots import load_metrics

    lines = (bad_run / "metrics.jsonl").read_text().splitlines()
    rows = [strict_loads(line) for line in lines]
    steps = {r["step"]: r for r in rows if "loss" in r}  # (an evaluation's record has no loss)
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert all(math.isfinite(steps[s]["loss"]) for s in range(1, FIRST_BAD))
    # the field is kept, so a reader sees the step was logged
    assert [steps[s]["loss"] for s in range(FIRST_BAD, STEPS + 1)] == [None, None]
    # pfc report reads null as NaN (a gap in the curve) and still draws the loss figure
    loss = dict(load_metrics(bad_run / "metrics.jsonl")["loss"])
    assert math.isnan(loss[FIRST_BAD]) and math.isfinite(loss[1])
    res = CliRunner().invoke(_app(), ["report", str(bad_run), "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "report" / "loss.png").stat().st_size > 0


@pytest.mark.multiprocess
def test_metrics_rows_of_a_study_read_null_as_nan(bad_run):
    from launcher.bench.study_runs import metrics_rows

    losses = {r["step"]: r["loss"] for r in metrics_rows(bad_run) if "loss" in r}
    assert math.isnan(losses[FIRST_BAD]) and math.isfinite(losses[1])


@pytest.mark.multiprocess
def test_summary_json_of_a_run_that_ended_on_a_skipped_step_is_strict(bad_run):
    summary = strict_loads((bad_run / "summary.json").read_text())
    assert summary["skipped_nonfinite"] == STEPS - FIRST_BAD + 1
    assert "loss" in summary["final"] and summary["final"]["loss"] is None


@pytest.mark.multiprocess
def test_best_json_with_no_finite_value_is_strict_and_the_run_resumes_from_it(dataset, bad_run, tmp_path):
    record = strict_loads((bad_run / "best" / "best.json").read_text())
    assert record["value"] is None and [h["value"] for h in record["history"]] == [None, None], record
    resumed = tmp_path / "run"
    shutil.copytree(bad_run, resumed)
    prefix, val_bin = dataset
    r = _pfc(_train_args(prefix, resumed, **{"train.steps": STEPS + 1, "checkpoint.every_steps": 3,
                                             "data.val_bins": [str(val_bin)], "eval.every_steps": 3,
                                             "checkpoint.keep_best": "tar@1e-4"}))
    assert r.returncode == 0, r.stderr[-3000:]
    history = strict_loads((resumed / "best" / "best.json").read_text())["history"]
    # resumed at step 3: the evaluation at 6 of the stretch the resume repeats is replaced, not kept twice
    assert history == [{"step": s, "value": None} for s in (3, 6, STEPS + 1)], history


@pytest.mark.multiprocess
def test_report_json_of_that_run_is_strict(bad_run, tmp_path):
    out = tmp_path / "report.json"
    res = CliRunner().invoke(_app(), ["report", str(bad_run), "--out", str(tmp_path / "png"), "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = strict_loads(out.read_text())
    assert doc["steps"] == STEPS and doc["last"]["loss"] is None
    assert math.isfinite(doc["last"]["lr"])


def test_a_study_with_a_heldout_measurement_that_is_nan_writes_strict_json(tmp_path):
    """A held-out set measured without xi has no class-mean-to-xi angle (NaN): `pfc bench discface` writes
    it in every study."""
    from discface import heldout_discrepancy
    from launcher.bench.study_runs import write_study

    gen = torch.Generator().manual_seed(0)
    disc = heldout_discrepancy(torch.randn(12, 8, generator=gen), torch.arange(12) % 4)
    assert math.isnan(disc["xi_angle_deg"])
    write_study(tmp_path / "study.json", {"runs": {"0": {"heldout_discrepancy": disc, "final_loss": None}}})
    got = strict_loads((tmp_path / "study.json").read_text())["runs"]["0"]["heldout_discrepancy"]
    assert got["xi_angle_deg"] is None and got["directional_deg"] == pytest.approx(disc["directional_deg"])


def test_numpy_scalars_and_tuples_are_written_strict_too():
    """What ``default=float`` wrote before (a NumPy float32 NaN as ``NaN``) is null; finite ones stay numbers."""
    import numpy as np

    from launcher.strict_json import dumps

    doc = {"a": np.float32("nan"), "b": np.float32(1.5), "c": (float("inf"), 2), "d": np.float64("-inf")}
    assert strict_loads(dumps(doc)) == {"a": None, "b": 1.5, "c": [None, 2], "d": None}


def _app() -> Any:
    from launcher.cli import app

    return app
