"""`pfc bench discface` end to end at a tiny size: both runs train, verify and report (through torchrun)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import launcher.cli  # noqa: F401  (registers every command on the app)
from launcher.bench import discface_study
from launcher.commands.groups import app


@pytest.mark.multiprocess
def test_bench_discface_trains_off_and_on_and_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # In this process (the runs still train under torchrun), with a verification set of 100 pairs of 10
    # identities instead of 6000 of 100: its decoding and embedding, in each run and again in the study's
    # verification, were most of this test's time. One intra-op thread in the ranks, as tests/conftest.py has here.
    monkeypatch.setattr(discface_study, "VAL_PAIRS", 100)
    monkeypatch.setattr(discface_study, "VAL_MIN_IDENTITIES", 10)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "study"
    proc = CliRunner().invoke(app, [
        "bench", "discface", "--output", str(out), "--lambdas", "0,0.1", "--identities", "10",
        "--images-per-identity", "3", "--heldout-identities", "4", "--steps", "2", "--nproc", "1", "--hard",
        "--set", "train.batch_size=6", "--set", "model.image_size=16", "--set", "head.sample_rate=1.0",
        "--json", str(tmp_path / "r.json")])
    assert proc.exit_code == 0, (proc.output[-3000:], proc.exception)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert set(doc["runs"]) == {"0", "0.1"}
    assert doc["hard_jitter"] is True
    assert "synthetic nuisance: hard (--hard" in proc.output  # the table says it, not only the JSON
    for run in doc["runs"].values():
        assert 0.0 <= run["accuracy"] <= 1.0 and "heldout_discrepancy" in run
    # the recipe's 20-step warm-up was fitted into the 2-step runs
    assert "warmup_steps: 2" in (out / "lambda_0" / "config.yaml").read_text()
    # --hard: the held-out set is the one drawn with HARD_JITTER (seed 0 + 7919), not the default nuisance
    from data_pipeline.synth import DEFAULT_JITTER, HARD_JITTER, generate

    study = (out / "data" / "heldout.rec").read_bytes()
    for name, jitter in (("hard", HARD_JITTER), ("default", DEFAULT_JITTER)):
        generate(tmp_path / name / "heldout", 4, 3, image_size=16, val_identities=0, seed=7919, workers=1,
                 jitter=jitter)
    assert study == (tmp_path / "hard" / "heldout.rec").read_bytes()
    assert study != (tmp_path / "default" / "heldout.rec").read_bytes()


def test_the_study_table_says_which_nuisance_it_drew() -> None:
    from launcher.bench.discface_study import format_study

    for hard, says in ((False, "synthetic nuisance: default (no --hard)"), (True, "synthetic nuisance: hard (--hard")):
        assert format_study({"hard_jitter": hard, "runs": {}}).splitlines()[0].startswith(says)


def test_the_training_discrepancy_is_the_mean_of_the_last_measurements(tmp_path: Path) -> None:
    """metrics.jsonl carries the last measured discrepancy on every row: the study averages the rows of the
    steps that measured (one measurement alone is noise at the scale the study compares)."""
    from launcher.bench.discface_study import _last_train_discrepancy
    from launcher.config import dump_config, load_config

    (tmp_path / "config.yaml").write_text(dump_config(load_config(None, ["eval.discrepancy_every_steps=2"])))
    measured = {2: 10.0, 4: 20.0, 6: 60.0}
    rows = [{"step": s, "loss": 1.0, "discrepancy_directional_deg": measured[s - s % 2] if s >= 2 else None,
             "discrepancy_radial_cv": 0.5} for s in range(2, 8)]  # step 7 repeats step 6's measurement
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _last_train_discrepancy(tmp_path) == {"directional_deg": 30.0, "radial_cv": 0.5}
    assert _last_train_discrepancy(tmp_path, window=2)["directional_deg"] == 40.0
