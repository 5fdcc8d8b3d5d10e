"""`dist.group_for_one_rank`: one `pfc train` process still gets a process group, so the multi-rank code
paths (DDP and its comm hook, the non-finite all-reduce, the checkpoint agreements, the evaluation
gathers, the hang watchdog) run on one device; and the watchdog counts evaluation and saves as progress.

Each test runs the real `pfc` entry point in a subprocess (gloo on the CPU; NCCL on a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.runs import _assert_same_run, _pfc, _train_args

pytestmark = pytest.mark.multiprocess


def _logged(out: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()
            if key in json.loads(line)]


def test_one_rank_group_runs_ddp_and_ends_with_the_weights_of_the_run_without_one(dataset, tmp_path):
    prefix, val_bin = dataset
    common = {"train.steps": 4, "checkpoint.every_steps": 2, "eval.every_steps": 4, "data.val_bins": [str(val_bin)]}
    plain, grouped = tmp_path / "plain", tmp_path / "grouped"
    r = _pfc(_train_args(prefix, plain, **common))
    assert r.returncode == 0, r.stderr[-3000:]
    r = _pfc(_train_args(prefix, grouped, **common, **{"dist.group_for_one_rank": True}))
    assert r.returncode == 0, r.stderr[-3000:]
    # DDP's gradient all-reduce ran (its comm hook times it) only where a group exists
    assert _logged(plain, "time_comm_s") == [0.0, 0.0]
    assert all(t > 0 for t in _logged(grouped, "time_comm_s")), _logged(grouped, "time_comm_s")
    # ... and changed nothing: same losses, same evaluation, same final weights bit for bit
    assert _logged(plain, "loss") == _logged(grouped, "loss")
    evals = [json.loads((o / "summary.json").read_text())["eval"] for o in (plain, grouped)]
    assert evals[0] and evals[0] == evals[1]
    _assert_same_run(plain, grouped)


def test_evaluation_and_saves_count_as_progress_for_the_hang_watchdog(dataset, tmp_path):
    """Step 2's evaluation and save each take 5 s longer (``PFC_FAULT=slow:2``): together 10 s, the whole
    ``dist.timeout_s``, which the watchdog (firing after 8 s without progress) used to take for a hang and
    stop the run with exit code 75. Each phase alone fits, and each now counts as progress."""
    prefix, val_bin = dataset
    out = tmp_path / "run"
    r = _pfc(_train_args(prefix, out, **{"train.steps": 3, "eval.every_steps": 2, "checkpoint.every_steps": 2,
                                         "data.val_bins": [str(val_bin)], "dist.group_for_one_rank": True,
                                         "dist.timeout_s": 10}), fault="slow:2")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "no progress" not in r.stdout + r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval"]
    assert (out / "checkpoints" / "step_00000002").is_dir()
