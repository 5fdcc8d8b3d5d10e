"""DeepSpeed ZeRO-1/2 around the backbone (head outside the engine) matches DDP step for step on CPU/gloo."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.support.distributed import run_ranks
from tests.support.runs import _assert_same_tensors, _head_matrix, _latest, _overrides, _train

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
    la = [json.loads(x)["loss"] for x in (ddp_out / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (ds_out / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-4)


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
