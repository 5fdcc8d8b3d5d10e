"""A save cut by a real SIGKILL while the head's shard file is being written (the kill a cluster sends once
``train.stop_grace_s`` or its own grace runs out, or the OOM killer): the previous save stays the one
``latest`` names and loads, and the run started again resumes there and ends with the uninterrupted run's
tensors, bit for bit.

The head is made large (``head.num_classes`` 300k x 64, about 150 MB of weight and momentum in its shard
file) so that the shard's write lasts long enough for the test to see its temporary file growing and kill
the process then: nothing is injected into the writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.runs import _assert_same_tensors, _latest, _pfc, _train_args

pytestmark = pytest.mark.multiprocess

SETTINGS = {"train.steps": 4, "checkpoint.every_steps": 2, "head.num_classes": 300_000,
            "eval.every_steps": 1000}


def _kill_while_writing_the_shard(args: list[str], partial: Path, timeout: float = 240) -> tuple[int, int]:
    """Run ``pfc`` (one process: the rank itself) and SIGKILL it once the shard's temporary file in
    ``partial``/head has bytes in it; (its exit status, the bytes the file had when the kill was sent)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.pop("PFC_FAULT", None)
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            for tmp in (partial / "head").glob(".head_shard_*.tmp-*"):
                try:
                    size = tmp.stat().st_size
                except FileNotFoundError:  # renamed into place between the listing and the stat
                    continue
                if size > 0:
                    proc.send_signal(signal.SIGKILL)
                    return proc.wait(), size
            time.sleep(0.0005)
        raise AssertionError(f"the shard of {partial} was never seen being written (exit {proc.poll()})")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigkill_mid_shard_write_keeps_latest_and_the_rerun_matches_the_uninterrupted_run(dataset, tmp_path):
    from launcher.trainer.checkpoint_files import load_checkpoint

    prefix, _ = dataset
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    r = _pfc(_train_args(prefix, clean, **SETTINGS))
    assert r.returncode == 0, r.stderr[-2000:]

    ckpts = killed / "checkpoints"
    status, size = _kill_while_writing_the_shard(_train_args(prefix, killed, **SETTINGS),
                                                 ckpts / ".step_00000004.partial")
    assert status == -signal.SIGKILL
    assert 0 < size < 2 * 300_000 * 64 * 4 + 1024, size  # cut inside the shard file (weight + momentum)
    assert _latest(killed).name == "step_00000002"
    assert not (ckpts / "step_00000004").exists()
    saved = load_checkpoint(_latest(killed), 0, 1)
    assert saved.step == saved.meta["step"] == 2

    r = _pfc(_train_args(prefix, killed, **SETTINGS))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout + r.stderr and "step_00000002" in r.stdout + r.stderr
    assert _latest(clean).name == _latest(killed).name == "step_00000004"
    _assert_same_tensors(_latest(clean), _latest(killed))
    assert not list(ckpts.glob(".*.partial")) and not list(ckpts.rglob(".*.tmp-*"))
