"""`pfc demo --nproc 1` (the default is 2) trains on one rank: the run's world size and its head shards say so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.support.runs import _pfc


@pytest.mark.multiprocess
def test_demo_nproc_one_trains_on_one_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny tensors on a shared machine: extra threads only spin
    out = tmp_path / "demo"
    r = _pfc(["demo", "--output", str(out), "--nproc", "1", "--identities", "10", "--images-per-identity", "2",
              "--steps", "2", "--set", "train.batch_size=4", "--set", "model.image_size=16",
              "--set", "model.embedding_size=16", "--set", "data.workers=0"], timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    device = "CUDA" if torch.cuda.is_available() else "CPU"  # the trainer's: CUDA wherever it is visible
    assert f"training on 1 {device} rank(s)" in r.stdout + r.stderr  # the log goes to stdout
    assert json.loads((out / "summary.json").read_text())["world_size"] == 1
    # Partial FC shards the class weights over the ranks: one rank holds all 10 classes
    (shard,) = (out / "checkpoints").glob("step_*/head/head_shard_*.safetensors")
    assert shard.name == "head_shard_0000000000_0000000010.safetensors"
    assert "trained" in r.stdout and (out / "eval.json").is_file()


def test_demo_names_the_device_its_ranks_train_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The log line follows the trainer's rule (CUDA wherever it is visible, whatever the recipe's gloo
    backend); it said "CPU" on a GPU machine. No GPU is needed: the rule's input is what is set here."""
    from launcher.demo import ranks_device

    for visible, device in ((True, "CUDA"), (False, "CPU")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda v=visible: v)
        assert ranks_device() == device


def test_demo_help_says_where_its_ranks_train() -> None:
    """`pfc demo --help` (and `pfc --help`'s line for it) called the ranks "CPU ranks", while on a machine
    where CUDA is visible they train on the GPU, as the demo's log line and the README say."""
    import re

    from typer.testing import CliRunner

    import launcher.cli  # noqa: F401  (registers every command on the app)
    from launcher.commands.groups import app

    def words(args: list[str]) -> str:
        res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        return " ".join(re.sub(r"[│╭╮╰╯─]", " ", res.output).split())

    own = words(["demo", "--help"])
    line = words(["--help"]).split(" demo ", 1)[1].split(" data Datasets:", 1)[0]  # its line, up to the next
    for text in (own, line):
        assert "CPU rank" not in text, text
    assert "the GPU(s) where CUDA is visible" in own, own
    assert "--nproc <int range> [x>=1] ranks: on the CPU, or on the GPU(s) where CUDA is visible" in own, own
