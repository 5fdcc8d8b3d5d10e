"""`pfc bench discface` end to end at a tiny size: both runs train, verify and report (through torchrun)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.multiprocess
def test_bench_discface_trains_off_and_on_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "study"
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "bench", "discface", "--output", str(out), "--lambdas", "0,0.1",
         "--identities", "10", "--images-per-identity", "3", "--heldout-identities", "4", "--steps", "2",
         "--nproc", "1", "--set", "train.batch_size=6", "--set", "model.image_size=16",
         "--set", "head.sample_rate=1.0", "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "r.json").read_text())
    assert set(doc["runs"]) == {"0", "0.1"}
    assert "synthetic nuisance: default (no --hard)" in proc.stdout
    for run in doc["runs"].values():
        assert 0.0 <= run["accuracy"] <= 1.0 and "heldout_discrepancy" in run
    # the recipe's 20-step warm-up was fitted into the 2-step runs
    assert "warmup_steps: 2" in (out / "lambda_0" / "config.yaml").read_text()
