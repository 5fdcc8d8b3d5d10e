"""DeepSpeed ZeRO-1/2 around the backbone (head outside the engine) matches DDP step for step on CPU/gloo."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.support.distributed import run_ranks
from tests.support.runs import _assert_same_tensors, _head_matrix, _latest, _overrides, _pfc, _train, _train_args

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.deepspeed,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="deepspeed not installed (pip install -e '.[deepspeed]')"),
]


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_matches_ddp(dataset, tmp_path, stage):
    prefix, _ = dataset
    common = {"train.steps": 4, "checkpoint.every_steps": 4, "optim.grad_clip": None,
              "head.discface_lambda": 0.1}
    ddp_out, ds_out = tmp_path / "ddp", tmp_path / f"zero{stage}"
    run_ranks(_train, 2, _overrides(prefix, ddp_out, **common), timeout=300)
    summaries = run_ranks(_train, 2, _overrides(prefix, ds_out, **common, **{"dist.engine": "deepspeed",
                                                                            "dist.zero_stage": stage}),
                          timeout=400)
    assert summaries[0]["steps"] == 4
    a, b = load_file(str(_latest(ddp_out) / "backbone.safetensors")), load_file(
        str(_latest(ds_out) / "backbone.safetensors"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"backbone tensor {k}")
    ha, hb = _head_matrix(_latest(ddp_out)), _head_matrix(_latest(ds_out))
    torch.testing.assert_close(hb[0], ha[0], rtol=1e-4, atol=1e-6)
    ddp_rows, ds_rows = ([json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines()]
                         for o in (ddp_out, ds_out))
    assert [r["loss"] for r in ddp_rows] == pytest.approx([r["loss"] for r in ds_rows], rel=1e-4)
    _assert_comm_time_only_under_ddp(ddp_rows, ds_rows)


def _assert_comm_time_only_under_ddp(ddp_rows: list[dict], ds_rows: list[dict]) -> None:
    """The same 2-rank run's step rows: DDP's comm hook timed its all-reduces; DeepSpeed's reductions are
    not timed, so its rows carry no ``time_comm_s`` at all (it used to log a false 0.0)."""
    assert len(ddp_rows) == len(ds_rows) == 2  # log.every_steps=2 of 4 steps
    assert all(r["time_comm_s"] > 0 for r in ddp_rows), [r.get("time_comm_s") for r in ddp_rows]
    assert all("time_backward_s" in r for r in ds_rows)  # step rows, with the phases that are timed
    assert [r for r in ds_rows if "time_comm_s" in r] == []


@pytest.mark.parametrize(("stage", "extra"), [(0, {}), (1, {}), (2, {}),
                                             (2, {"optim.name": "adamw", "optim.grad_accum": 2})])
def test_zero_resume_on_the_same_ranks_is_bit_identical(dataset, tmp_path, stage, extra):
    """Stopped at step 2 and resumed to 4 on the same 2 ranks (each reads back its own ZeRO partition of
    the optimizer state, through the weights-only loader): the weights of the uninterrupted run.
    (ZeRO's state dict held objects that loader refuses, so such a resume used to stop at start.)"""
    prefix, _ = dataset
    common = {"train.steps": 4, "checkpoint.every_steps": 2, "dist.engine": "deepspeed", "dist.zero_stage": stage,
              **extra}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_ranks(_train, 2, _overrides(prefix, straight, **common), timeout=400)
    run_ranks(_train, 2, _overrides(prefix, resumed, **common, **{"train.stop_after": 2}), timeout=400)
    assert _latest(resumed).name == "step_00000002"
    run_ranks(_train, 2, _overrides(prefix, resumed, **common), timeout=400)
    assert _latest(straight).name == _latest(resumed).name == "step_00000004"
    _assert_same_tensors(_latest(straight), _latest(resumed))


def test_a_backbone_step_that_zero_skips_skips_the_head_too(dataset, tmp_path):
    """Only the backbone's gradients are NaN at step 2 (``PFC_FAULT=nan_grad:2``; the loss and the head's
    gradients are finite). DDP's veto sees them; under DeepSpeed ZeRO finds them inside its own step and
    skips the backbone. The head must then skip too, and the step count as non-finite, as under DDP: the
    same final weights. (The head used to step alone, reported as a finite step.)"""
    prefix, _ = dataset
    common = {"train.steps": 4, "checkpoint.every_steps": 4}
    runs = {"ddp": {}, "zero1": {"dist.engine": "deepspeed", "dist.zero_stage": 1}}
    for name, extra in runs.items():
        r = _pfc(_train_args(prefix, tmp_path / name, **common, **extra), fault="nan_grad:2")
        assert r.returncode == 0, r.stderr[-3000:]
        assert "step 2: non-finite gradients; step skipped" in r.stdout + r.stderr, name
        assert json.loads((tmp_path / name / "summary.json").read_text())["skipped_nonfinite"] == 1, name
    ddp, zero = _latest(tmp_path / "ddp"), _latest(tmp_path / "zero1")
    torch.testing.assert_close(_head_matrix(zero)[0], _head_matrix(ddp)[0], rtol=1e-4, atol=1e-6)
    a, b = load_file(str(ddp / "backbone.safetensors")), load_file(str(zero / "backbone.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"backbone tensor {k}")


def test_zero_resume_on_fewer_ranks_continues_from_the_loaded_backbone(dataset, tmp_path):
    """Saved by ZeRO-1 on 2 ranks at step 2, resumed on 1 rank for step 3: ZeRO's fp32 master copy is
    refreshed from the loaded weights, so step 3 continues from them. The reference is DDP doing the same
    (SGD without momentum: the optimizer state that a new world size cannot restore is empty anyway).
    ZeRO's first step used to copy its master (cloned from the initial weights) back over them."""
    prefix, _ = dataset
    common = {"train.steps": 3, "checkpoint.every_steps": 1, "optim.momentum": 0.0, "optim.grad_clip": None}
    runs = {"ddp": {}, "zero1": {"dist.engine": "deepspeed", "dist.zero_stage": 1}}
    for name, extra in runs.items():
        out = tmp_path / name
        run_ranks(_train, 2, _overrides(prefix, out, **common, **extra, **{"train.stop_after": 2}), timeout=400)
        run_ranks(_train, 1, _overrides(prefix, out, **common, **extra), timeout=400)
        assert _latest(out).name == "step_00000003"
    ddp, zero = _latest(tmp_path / "ddp"), _latest(tmp_path / "zero1")
    a, b = load_file(str(ddp / "backbone.safetensors")), load_file(str(zero / "backbone.safetensors"))
    loaded = load_file(str(zero.parent / "step_00000002" / "backbone.safetensors"))
    assert any(not torch.equal(b[k], loaded[k]) for k in b), "step 3 did not move the backbone"
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"backbone tensor {k}")
    torch.testing.assert_close(_head_matrix(zero)[0], _head_matrix(ddp)[0], rtol=1e-4, atol=1e-6)
