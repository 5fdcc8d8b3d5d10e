"""`pfc demo --nproc 1` (the default is 2) trains on one rank: the run's world size and its head shards say so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.runs import _pfc


@pytest.mark.multiprocess
def test_demo_nproc_one_trains_on_one_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny tensors on a shared machine: extra threads only spin
    out = tmp_path / "demo"
    r = _pfc(["demo", "--output", str(out), "--nproc", "1", "--identities", "10", "--images-per-identity", "2",
              "--steps", "2", "--set", "train.batch_size=4", "--set", "model.image_size=16",
              "--set", "model.embedding_size=16", "--set", "data.workers=0"], timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "training on 1 CPU rank(s)" in r.stdout + r.stderr  # the log goes to stdout
    assert json.loads((out / "summary.json").read_text())["world_size"] == 1
    # Partial FC shards the class weights over the ranks: one rank holds all 10 classes
    (shard,) = (out / "checkpoints").glob("step_*/head/head_shard_*.safetensors")
    assert shard.name == "head_shard_0000000000_0000000010.safetensors"
    assert "trained" in r.stdout and (out / "eval.json").is_file()
