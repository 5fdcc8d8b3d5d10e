"""A resume that cannot go on ends through the real `pfc train` as a user error: one line on stderr, exit 2,
no traceback. A setting that shapes the backbone changed (MobileFaceNet's model.scale and model.blocks,
which used to end in load_state_dict's size-mismatch traceback), a setting the state is tied to changed, a
rank file carrying pickled code, and each file of a real save damaged by truncation (an interrupted copy),
which is named, with the earlier save to point ``latest`` at.

Every command is a fork of one process that imported the launcher (tests/support/pfc_forks.py): a refusal
costs 0.1 s instead of a 3 s interpreter start. The cases that resume a run of the default model each resume
their own copy of one run trained once."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

from tests.support.runs import _latest, _train_args, refused_in_one_line

pytestmark = pytest.mark.multiprocess

MBF = {"model.backbone": "mobilefacenet", "head.discface_lambda": 0.0, "train.steps": 2,
       "checkpoint.every_steps": 2}
TRAINED = {"train.steps": 4, "checkpoint.every_steps": 2}


@pytest.fixture(scope="module")
def trained(dataset, pfc, tmp_path_factory) -> Path:
    """The run folder of a 4-step run with saves at steps 2 and 4 (``latest``: step 4)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    r = pfc.run(_train_args(dataset[0], out, **TRAINED))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _copy_of(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run", symlinks=True))


def test_a_changed_mobilefacenet_shape_is_refused_in_one_line(dataset, pfc, tmp_path):
    prefix, _ = dataset
    out = tmp_path / "run"
    r = pfc.run(_train_args(prefix, out, **MBF))
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = _latest(out)
    r = pfc.run(_train_args(prefix, out, **{**MBF, "train.steps": 4, "model.scale": 2, "model.blocks": [1, 2, 2, 1]}))
    line = refused_in_one_line(r)
    assert line.startswith(f"pfc: refusing to resume from {ckpt}: "), line
    assert "model.scale is 1 in the checkpoint, 2 now" in line, line
    assert "model.blocks is [1, 4, 6, 2] in the checkpoint, [1, 2, 2, 1] now" in line, line
    assert _latest(out) == ckpt
    # MobileFaceNet's default repeats named explicitly are no change: the run resumes
    r = pfc.run(_train_args(prefix, out, **{**MBF, "train.steps": 4, "model.blocks": [1, 4, 6, 2]}))
    assert r.returncode == 0, r.stderr[-2000:]
    assert _latest(out).name == "step_00000004"


class _Payload:
    """Unpickling this runs ``Path(marker).touch()``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_resume_refusals_are_one_line_through_pfc_train(dataset, pfc, trained, tmp_path):
    prefix, _ = dataset
    out = _copy_of(trained, tmp_path)
    ckpt = _latest(out)
    # a setting the state is tied to
    r = pfc.run(_train_args(prefix, out, **{**TRAINED, "train.steps": 6, "model.width": 2.0}))
    line = refused_in_one_line(r)
    assert line.startswith(f"pfc: refusing to resume from {ckpt}: model.width is 1.0 in the checkpoint, 2.0 now"), line
    # a rank file carrying pickled code: refused by name, nothing of it runs
    rank_file = ckpt / "rank" / "rank_00000.pt"
    marker = tmp_path / "pwned"
    rank_file.write_bytes(pickle.dumps({"state": _Payload(marker)}))
    r = pfc.run(_train_args(prefix, out, **{**TRAINED, "train.steps": 6}))
    line = refused_in_one_line(r)
    assert line.startswith(f"pfc: refusing to resume: {rank_file} holds more than tensors and plain data"), line
    assert not marker.exists()
    assert _latest(out) == ckpt


def test_each_damaged_checkpoint_file_is_named_in_one_line(dataset, pfc, trained, tmp_path):
    prefix, _ = dataset
    out = _copy_of(trained, tmp_path)
    ckpt = _latest(out)
    assert ckpt.name == "step_00000004" and (ckpt.parent / "step_00000002" / "meta.json").is_file()
    shards = sorted(ckpt.glob("head/head_shard_*.safetensors"))
    assert shards and (ckpt / "head" / "head_discface.safetensors").is_file()
    files = [ckpt / "meta.json", ckpt / "trainer_state.pt", ckpt / "rank" / "rank_00000.pt",
             ckpt / "backbone.safetensors", *shards, ckpt / "head" / "head_discface.safetensors",
             ckpt / "head" / "head_meta.json"]
    resume = _train_args(prefix, out, **{**TRAINED, "train.steps": 6})
    for f in files:
        keep = tmp_path / "whole"
        shutil.copyfile(f, keep)
        with open(f, "r+b") as fh:  # really truncated: what an interrupted copy leaves
            fh.truncate(f.stat().st_size // 2)
        r = pfc.run(resume)
        line = refused_in_one_line(r)
        if f.name == "head_meta.json":  # the head checkpoint's own reader names it
            assert line.startswith(f"pfc: {f}: not valid JSON"), line
        else:
            assert line.startswith(f"pfc: {f}: damaged ("), line
            assert line.endswith(f"{ckpt.name} cannot be resumed from: restore the file, or point "
                                 f"{ckpt.parent / 'latest'} at an earlier save (step_00000002)"), line
        assert _latest(out) == ckpt, "training must not go on from a damaged checkpoint"
        shutil.copyfile(keep, f)
