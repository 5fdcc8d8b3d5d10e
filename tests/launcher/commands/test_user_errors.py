"""Issue 13, item 8 (and issue 12 item 11's ``checkpoint.resume=false``): a user error at run time is ONE
line on stderr and a non-zero exit, from the real `pfc` command, single-process and under torchrun (2 ranks);
``--debug`` keeps the traceback. Item 7's data messages (one identity, a bad header record) are here too.

Single-process commands are forks of one process that imported the launcher (tests/support/pfc_forks.py):
0.1 s a refusal instead of a 3 s interpreter start. torchrun's, and those that need an environment of their
own, start `pfc` afresh."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.runs import (
    _pfc,
    _train_args,
    dataset,  # noqa: F401
)

pytestmark = pytest.mark.multiprocess


def _one_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert "Traceback" not in stderr, stderr[-4000:]
    pfc = [x for x in lines if x.startswith("pfc: ")]
    assert len(pfc) == 1, stderr[-4000:]
    return pfc[0]


@pytest.mark.parametrize("nproc", [1, 2])
def test_dataset_smaller_than_one_batch_per_rank_is_one_line(dataset, pfc, tmp_path, nproc,  # noqa: F811
                                                             monkeypatch):
    prefix, _ = dataset  # 48 identities x 8 images = 384 images
    args = _train_args(prefix, tmp_path / "run", **{"train.batch_size": 400, "train.steps": 2})
    scratch = tmp_path / "tmpdir"  # the launcher's and torchrun's temporary folders: none is left behind
    # (torchinductor_<user> is torch's compile cache, kept across processes by design)
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    r = _pfc([*args, "--nproc-per-node", str(nproc)], timeout=240) if nproc > 1 else pfc.run(args, timeout=240)
    left = [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")]
    assert not left, left
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    line = _one_line(r.stderr)
    assert "fewer than one batch of 400" in line and "train.batch_size" in line, line
    if nproc > 1:
        assert line.startswith("pfc: rank ") and "ChildFailedError" not in r.stderr


def test_image_size_mismatch_and_missing_data_are_one_line(dataset, pfc, tmp_path):  # noqa: F811
    prefix, _ = dataset
    r = pfc.run(_train_args(prefix, tmp_path / "a", **{"model.image_size": 64}), timeout=240)
    assert r.returncode == 2
    assert "model.image_size=64 but" in _one_line(r.stderr)
    r = pfc.run(_train_args(tmp_path / "nowhere" / "train", tmp_path / "b"), timeout=240)
    assert r.returncode == 2
    assert str(tmp_path / "nowhere") in _one_line(r.stderr)
    # --debug keeps the traceback
    r = pfc.run(["--debug", *_train_args(prefix, tmp_path / "c", **{"model.image_size": 64})], timeout=240)
    assert r.returncode != 0 and "Traceback" in r.stderr and "model.image_size=64 but" in r.stderr


def test_resume_false_into_a_folder_holding_a_run_is_refused(dataset, pfc, tmp_path):  # noqa: F811
    prefix, _ = dataset
    out = tmp_path / "run"
    args = _train_args(prefix, out, **{"train.steps": 2, "checkpoint.every_steps": 2, "checkpoint.resume": False})
    # a fresh folder with resume=false trains as before (and holds a run then)
    r = pfc.run(args, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = (out / "metrics.jsonl").read_text()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")}
    assert metrics and before
    for nproc in (1, 2):
        # --max-restarts: torchrun would restart a refused rank, and the restart took the run for its own
        r = (_pfc([*args, "--nproc-per-node", "2", "--max-restarts", "1"], timeout=240) if nproc > 1
             else pfc.run(args, timeout=240))
        assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
        line = _one_line(r.stderr)
        assert f"output folder {out} holds a run" in line and "checkpoint.resume=false" in line, line
        assert (out / "metrics.jsonl").read_text() == metrics, "metrics.jsonl was appended to"
        assert {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")} == before
    # torchrun started by hand (as the PyTorchJob does): the first attempt refuses in the rank, and its restart
    # refuses too (it resumed the other run's saves: exit 0)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                        "--max-restarts", "1", "-m", "launcher", *args], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    log = r.stdout + r.stderr
    assert r.returncode != 0 and "resumed from" not in log, log[-3000:]
    assert log.count(f"output folder {out} holds a run") >= 2, log[-3000:]  # both attempts refused
    assert (out / "metrics.jsonl").read_text() == metrics, "metrics.jsonl was appended to"
    assert {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")} == before


def _copy(prefix: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in prefix.parent.iterdir():
        shutil.copy(f, dst / f.name)
    return dst / prefix.name


def _patch_header_label(prefix: Path, start: float, end: float) -> None:
    """Rewrite the two float32 label values of the header record (key 0, the first record of the .rec)."""
    with open(f"{prefix}.rec", "r+b") as f:
        f.seek(8 + 24)  # chunk header (magic, length) and IRHeader (flag, label, id, id2)
        f.write(struct.pack("<ff", start, end))


@pytest.mark.parametrize("label", [(float("nan"), 400.0), (0.0, 0.0)])
def test_header_record_with_nan_or_zeros_names_the_file(dataset, pfc, tmp_path, label):  # noqa: F811
    prefix, _ = dataset
    bad = _copy(prefix, tmp_path / "bad")
    _patch_header_label(bad, *label)
    r = pfc.run(_train_args(bad, tmp_path / "run", **{"train.steps": 2}), timeout=240)
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    line = _one_line(r.stderr)
    assert f"{bad}.rec" in line and "record key 0" in line and "is not [id_start, id_end]" in line, line


def test_dataset_with_one_identity_names_the_property_file(pfc, tmp_path):
    from data_pipeline.synth import generate

    prefix = tmp_path / "one" / "train"
    generate(prefix, 1, 40, image_size=32, val_identities=2, val_pairs=4, seed=1, workers=1)
    r = pfc.run(_train_args(prefix, tmp_path / "run", **{"train.steps": 2}), timeout=240)
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    line = _one_line(r.stderr)
    assert str(prefix.parent / "property") in line and "1 identity" in line, line
    json.dumps(line)


@pytest.mark.deepspeed
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_deepspeed_without_nproc_per_node_runs_single_process(dataset, tmp_path):  # noqa: F811
    """Issue 13, item 6: `pfc train ... --set dist.engine=deepspeed` alone runs on one process, as DDP does."""
    prefix, _ = dataset
    out = tmp_path / "run"
    r = _pfc(_train_args(prefix, out, **{"train.steps": 2, "checkpoint.every_steps": 2, "dist.engine": "deepspeed",
                                         "dist.zero_stage": 1, "optim.grad_clip": None}), timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 1
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def test_online_wandb_without_a_key_stops_before_anything_runs(tmp_path, monkeypatch):
    """A tracking backend the run cannot use is refused before any rank starts or any data is read (the data
    path here does not exist): one line, exit 2. It used to be a RuntimeError traceback after the data, the
    model and the resume."""
    pytest.importorskip("wandb", reason="the tracking extra is not installed (CI installs it)")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    r = _pfc(_train_args(tmp_path / "nowhere" / "train", tmp_path / "run",
                         **{"log.backends": ["jsonl", "wandb"], "log.wandb_mode": "online"}), timeout=240)
    assert r.returncode == 2, r.stderr[-4000:]
    assert "log.wandb_mode=online needs WANDB_API_KEY" in _one_line(r.stderr)
    assert not (tmp_path / "run").exists()


def test_several_nodes_without_a_rendezvous_endpoint_is_refused_at_once(pfc, tmp_path):
    """torchrun would start --standalone, whose rendezvous no other node can join, and wait forever."""
    r = pfc.run(["train", "demo_cpu", "--nproc-per-node", "2", "--nnodes", "2", "--output", str(tmp_path / "run")],
                timeout=60)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "--nnodes 2 needs --rdzv-endpoint HOST:PORT" in _one_line(r.stderr)
    assert not (tmp_path / "run").exists()


def test_torchrun_logs_where_the_user_asked_and_otherwise_in_the_launchs_folder(tmp_path):
    """torchrun reads PET_* variables as its options: a user's PET_LOG_DIR, or ranks' output it was asked to
    keep (PET_REDIRECTS, PET_TEE), must not go to a folder removed with the launch."""
    from torch.distributed.run import parse_args

    from launcher.distributed import torchrun_log_dir

    folder = tmp_path / "launch" / "torchrun"
    assert torchrun_log_dir({}, folder) == [f"--log-dir={folder}"]
    for env in ({"PET_LOG_DIR": str(tmp_path / "mine")}, {"PET_TEE": "3"}, {"PET_REDIRECTS": "3"}):
        assert torchrun_log_dir(env, folder) == [], env
    # what torchrun then takes: the user's folder
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PET_LOG_DIR", str(tmp_path / "mine"))
        args = parse_args([*torchrun_log_dir(dict(os.environ), folder), "-m", "launcher.cli"])
    assert args.log_dir == str(tmp_path / "mine")
