"""`pfc report RUN_DIR`: PNG curves from metrics.jsonl, resume-safe, clear errors."""

from __future__ import annotations

import json
import math

import matplotlib.image
import pytest
from typer.testing import CliRunner

from launcher.cli import app
from launcher.monitoring.plots import ReportError, load_metrics


def _records() -> list[dict]:
    recs = []
    for step in range(10, 110, 10):
        recs.append({"step": step, "time": 1.0e9 + step, "images_per_s": 100.0 + step, "memory_bytes": 1 << 30,
                     "loss": 20.0 - step / 10, "loss_softmax": 19.0 - step / 10, "loss_disc": 1.0, "lr": 0.1,
                     "grad_norm": 2.0, "xi_norm": 0.1, "time_data_s": 0.01, "time_forward_s": 0.02,
                     "time_backward_s": 0.03, "time_comm_s": 0.01, "time_optimizer_s": 0.005,
                     "discrepancy_directional_deg": 80.0 - step / 10, "discrepancy_radial_cv": 0.2,
                     "discrepancy_radial_std": 0.1, "discrepancy_directional_circvar": 0.5,
                     "discrepancy_eps_norm_mean": 0.3, "discrepancy_xi_angle_deg": 90.0})
        if step % 50 == 0:
            recs.append({"step": step, "time": 1.0e9 + step, "val_lfw_accuracy": 0.5 + step / 1000,
                         "val_lfw_accuracy_std": 0.01, "note": "text fields are ignored"})
    return recs


def test_load_metrics_keeps_the_last_record_of_a_step(tmp_path):
    recs = _records()
    # a resume from step 50 repeats steps 60 and 70 with other values; a NaN loss stays a gap
    recs += [dict(recs[0], step=60, loss=3.0), dict(recs[0], step=70, loss=float("nan"))]
    f = tmp_path / "metrics.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    s = load_metrics(f)
    steps = [st for st, _ in s["loss"]]
    assert steps == list(range(10, 110, 10))
    assert dict(s["loss"])[60] == 3.0 and math.isnan(dict(s["loss"])[70])
    assert dict(s["loss"])[80] == pytest.approx(12.0, abs=0)
    assert s["val_lfw_accuracy"] == [(50, 0.55), (100, 0.6)]
    assert "note" not in s and "time" not in s and "step" not in s


def test_report_command_writes_every_figure(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    summary = tmp_path / "report.json"
    res = CliRunner().invoke(app, ["report", str(run), "--json", str(summary)])
    assert res.exit_code == 0, res.output
    out = json.loads(summary.read_text())
    assert set(out["files"]) == {"loss", "throughput", "lr", "step_time", "discrepancy_directional",
                                 "discrepancy_radial", "val_accuracy"}
    assert out["skipped"] == [] and out["steps"] == 100
    assert out["last"]["loss"] == 10.0 and out["last"]["val_lfw_accuracy"] == 0.6
    for path in out["files"].values():
        img = matplotlib.image.imread(path)
        assert img.shape[0] == 400 and img.shape[1] == 700  # 7x4 inches at 100 dpi
        assert img[..., :3].std() > 0.05  # not a blank canvas
    assert "val_lfw_accuracy 0.6" in res.output


def test_report_without_discface_or_validation_skips_those_figures(tmp_path):
    keep = ("step", "loss", "loss_softmax", "images_per_s", "lr", "time_data_s")
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k in keep}) + "\n" for r in _records() if "loss" in r))
    res = CliRunner().invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "png")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["loss.png", "lr.png", "step_time.png",
                                                                   "throughput.png"]
    assert "no data for: discrepancy_directional, discrepancy_radial, val_accuracy" in res.output


def test_report_errors_name_the_file_and_line(tmp_path):
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and f"{tmp_path / 'metrics.jsonl'}: no such file" in res.output
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \n')
    with pytest.raises(ReportError, match=rf"{f}:2: not a JSON object"):
        load_metrics(f)
    f.write_text('{"step": "one", "loss": 2.0}\n')
    with pytest.raises(ReportError, match=rf"{f}:1: expected a JSON object with an integer 'step'"):
        load_metrics(f)
