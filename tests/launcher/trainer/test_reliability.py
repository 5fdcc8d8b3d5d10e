"""Injected faults (``PFC_FAULT``, see launcher/trainer/faults.py): a lost rank, a crash or a full disk during a
checkpoint, non-finite losses. Each run is a real `pfc train` process (torchrun where ranks are needed)."""

from __future__ import annotations

import json
import time

import pytest

from tests.support.runs import _assert_same_run, _latest, _pfc, _train_args

pytestmark = pytest.mark.multiprocess


def test_rank_killed_mid_run_restarts_from_latest_and_matches_uninterrupted(dataset, tmp_path):
    prefix, _ = dataset
    common = {"train.steps": 8, "checkpoint.every_steps": 2}
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    r = _pfc([*_train_args(prefix, clean, **common), "--nproc-per-node", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    t0 = time.monotonic()
    # checkpoint.resume=false: the restart still resumes from the saves its failed attempt wrote (it started
    # over at step 1); the default's restart is the SLURM test's (tests/deploy/test_launch.py)
    r = _pfc([*_train_args(prefix, faulty, **common, **{"checkpoint.resume": False}), "--nproc-per-node", "2",
              "--max-restarts", "1"], fault="kill:5:1")
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "resumed from" in log and "step_00000004" in log, log[-3000:]
    assert "Signals.SIGKILL" in log or "SIGKILL" in log or "exitcode: -9" in log, log[-3000:]
    _assert_same_run(clean, faulty)
    print(f"kill at step 5, resumed from step 4, 1 step recomputed, whole faulty run {elapsed:.1f}s")


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(dataset, tmp_path):
    prefix, _ = dataset
    out = tmp_path / "run"
    args = _train_args(prefix, out, **{"train.steps": 6, "checkpoint.every_steps": 2})
    r = _pfc(args, fault="ckpt_crash:4")
    assert r.returncode == 17, r.stderr[-2000:]
    ckpts = out / "checkpoints"
    assert _latest(out).name == "step_00000002"
    assert (ckpts / ".step_00000004.partial").is_dir(), "the half-written save should be left as .partial"
    assert not (ckpts / "step_00000004").exists()
    # The previous checkpoint loads; the next run resumes from it and cleans the partial folder up.
    from launcher.trainer.checkpoint_files import load_checkpoint

    files = load_checkpoint(_latest(out), 0, 1)
    assert files.meta["step"] == 2 and files.trainer_state["step"] == 2
    r = _pfc(args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout + r.stderr
    assert _latest(out).name == "step_00000006"
    assert not list(ckpts.glob(".*.partial"))


def test_full_disk_during_a_checkpoint_is_reported_and_training_goes_on(dataset, tmp_path):
    prefix, _ = dataset
    out = tmp_path / "run"
    r = _pfc(_train_args(prefix, out, **{"train.steps": 6, "checkpoint.every_steps": 2}), fault="ckpt_enospc:4")
    assert r.returncode == 0, r.stderr[-2000:]
    log = r.stdout + r.stderr
    assert "checkpoint for step 4 was not written" in log and "No space left on device" in log
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000006"]
    assert not list(ckpts.glob(".*.partial"))
    # When saving keeps failing the run stops, naming the cause, with the last good checkpoint intact.
    out2 = tmp_path / "run2"
    r = _pfc(_train_args(prefix, out2, **{"train.steps": 6, "checkpoint.every_steps": 2,
                                          "checkpoint.max_failures_in_a_row": 1}), fault="ckpt_enospc:4")
    assert r.returncode != 0
    assert "No space left on device" in r.stdout + r.stderr
    assert _latest(out2).name == "step_00000002"


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(dataset, tmp_path):
    prefix, _ = dataset
    out = tmp_path / "run"
    r = _pfc(_train_args(prefix, out, **{"train.steps": 12, "checkpoint.every_steps": 2,
                                         "train.max_nonfinite_in_a_row": 3}), fault="nan:3+")
    assert r.returncode != 0
    log = r.stdout + r.stderr
    assert "step 3: non-finite loss and gradients; step skipped" in log, log[-2000:]
    assert "3 non-finite steps in a row (last at step 5)" in log
    assert _latest(out).name == "step_00000002", "the kept checkpoint must predate the first bad step"
    # the step that reached the limit is logged too (it stopped the run before its row was written)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 5 and rows[-1]["loss"] is None, rows[-1]  # not finite: null (strict JSON)
    # An isolated bad step is skipped and counted, and the run finishes.
    out2 = tmp_path / "run2"
    r = _pfc(_train_args(prefix, out2, **{"train.steps": 6, "checkpoint.every_steps": 6}), fault="nan:3")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out2 / "summary.json").read_text())
    assert summary["skipped_nonfinite"] == 1 and summary["steps"] == 6


def test_a_static_rendezvous_restart_of_a_resume_false_run_resumes_its_own_saves(dataset, tmp_path):
    """torchrun started by hand with --master-addr/--master-port (a static rendezvous: its run id is "none",
    as under c10d without --rdzv-id, the PyTorchJob's): rank 0 is killed at step 5 of a checkpoint.resume=false
    run; the restart resumes the saves its first attempt wrote (it was refused: 'holds a run')."""
    import os
    import subprocess
    import sys

    from tests.deploy.guide import free_port

    prefix, _ = dataset
    out = tmp_path / "run"
    args = _train_args(prefix, out, **{"train.steps": 6, "checkpoint.every_steps": 2, "checkpoint.resume": False})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "1",
                        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--max-restarts", "1",
                        "-m", "launcher", *args], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**env, "PFC_FAULT": "kill:5:0"})
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "resumed from" in log and "step_00000004" in log and "holds a run" not in log, log[-3000:]
    assert _latest(out).name == "step_00000006"
