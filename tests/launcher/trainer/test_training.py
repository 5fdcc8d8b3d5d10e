"""End-to-end training on real gloo ranks: learning, checkpoints, exact resume, resume on another world size."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.support.distributed import run_ranks
from tests.support.runs import IMAGE, _head_matrix, _latest, _overrides, _train

pytestmark = pytest.mark.multiprocess

def test_two_ranks_learn_checkpoint_and_eval_reads_it(dataset, tmp_path):
    prefix, val_bin = dataset
    out = tmp_path / "run"
    sets = _overrides(prefix, out, **{"train.steps": 60, "checkpoint.every_steps": 30,
                                      "eval.every_steps": 60, "data.val_bins": [str(val_bin)]})
    summaries = run_ranks(_train, 2, sets, timeout=400)
    assert summaries[0]["steps"] == 60 and summaries[1]["steps"] == 60
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, f"loss did not fall: {losses}"
    assert any("discrepancy_directional_deg" in r or any(k.startswith("discrepancy") for k in r) for r in rows)
    ckpt = _latest(out)
    assert ckpt.name == "step_00000060" and (ckpt / "backbone.safetensors").is_file()
    assert len(list((out / "checkpoints").glob("step_*"))) == 2

    from launcher.cli import app

    res_json = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", str(out), "--bin", str(val_bin), "--json", str(res_json),
                                         "--device", "cpu"])
    assert result.exit_code == 0, result.output
    trained = json.loads(res_json.read_text())[val_bin.name]
    assert set(trained["tar_at_far"]) == {"1e-4", "1e-3", "1e-2"}
    # The same architecture, untrained, evaluated the same way.
    from launcher.config import load_config
    from launcher.distributed import DistContext
    from launcher.trainer.evaluation import evaluate_bins
    from partialfc.backbones import get_backbone

    cfg = load_config(None, sets)
    torch.manual_seed(5)
    untrained = get_backbone("tiny", embedding_size=64, image_size=IMAGE)
    base = evaluate_bins(untrained, [str(val_bin)], cfg, DistContext.single_process())
    assert trained["accuracy"] > base[val_bin.name]["accuracy"] + 0.03, (trained, base)
    # The evaluation during training, sharded over 2 ranks, saw the same model as `pfc eval`.
    # (rounding differs with the batch split and thread count, which can flip a pair at the threshold)
    assert summaries[0]["eval"][val_bin.name]["accuracy"] == pytest.approx(trained["accuracy"], abs=0.01)


def test_resume_continues_from_checkpoint_exactly(dataset, tmp_path):
    """A run stopped at step 6 and resumed to 12 ends with the same weights as one that never stopped."""
    prefix, _ = dataset
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = {"checkpoint.every_steps": 6, "optim.warmup_steps": 3}
    run_ranks(_train, 2, _overrides(prefix, straight, **{"train.steps": 12, **common}), timeout=300)
    # The interrupted run: the same schedule (train.steps=12) but stopped after the step-6 checkpoint.
    run_ranks(_train, 2, _overrides(prefix, resumed, **{"train.steps": 12, "train.stop_after": 6, **common}),
              timeout=300)
    assert _latest(resumed).name == "step_00000006"
    run_ranks(_train, 2, _overrides(prefix, resumed, **{"train.steps": 12, **common}), timeout=300)
    a, b = _latest(straight), _latest(resumed)
    assert a.name == b.name == "step_00000012"
    wa, wb = load_file(str(a / "backbone.safetensors")), load_file(str(b / "backbone.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"backbone tensor {k} differs after resume"
    ha, hb = _head_matrix(a), _head_matrix(b)
    assert torch.equal(ha[0], hb[0]) and torch.equal(ha[1], hb[1])
    da = load_file(str(a / "head" / "head_discface.safetensors"))
    db = load_file(str(b / "head" / "head_discface.safetensors"))
    assert all(torch.equal(da[k], db[k]) for k in da)
    # The logged loss and lr are the step's own, not a running mean that restarts with the process.
    rows_a, rows_b = ({r["step"]: r for r in map(json.loads, (o / "metrics.jsonl").read_text().splitlines())
                       if "lr" in r} for o in (straight, resumed))
    for s in (8, 10, 12):
        for k in ("loss", "loss_softmax", "loss_disc", "lr"):
            assert rows_b[s][k] == rows_a[s][k], (s, k, rows_a[s][k], rows_b[s][k])


def _load_only(rank: int, world_size: int, overrides: list[str]) -> dict:
    """Build the trainer on this world size and load the latest checkpoint; return this rank's head."""
    from launcher.config import load_config
    from launcher.distributed import init_distributed
    from launcher.trainer.batches import load_data
    from launcher.trainer.checkpointer import maybe_resume
    from launcher.trainer.components import build

    cfg = load_config(None, overrides)
    ctx = init_distributed("gloo")
    data = load_data(cfg, ctx)
    c = build(cfg, ctx, data.num_classes)
    step = maybe_resume(c, cfg, ctx)
    data.close()
    return {"step": step, "range": c.head.class_range, "weight": c.head.weight.detach().clone(),
            "momentum": c.head_opt.momentum_buffer.clone(), "sampler_step": c.head.step}


@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 2)])
def test_resume_on_another_world_size_keeps_the_head(dataset, tmp_path, first, second):
    prefix, _ = dataset
    out = tmp_path / "run"
    run_ranks(_train, first, _overrides(prefix, out, **{"train.steps": 4, "checkpoint.every_steps": 4}),
              timeout=300)
    saved_w, saved_m = _head_matrix(_latest(out))
    loaded = run_ranks(_load_only, second, _overrides(prefix, out, **{"train.steps": 6}), timeout=300)
    assert [r["step"] for r in loaded] == [4] * second
    assert loaded[0]["range"][0] == 0 and loaded[-1]["range"][1] == saved_w.shape[0]
    assert torch.equal(torch.cat([r["weight"] for r in loaded]), saved_w)
    assert torch.equal(torch.cat([r["momentum"] for r in loaded]), saved_m)
    # ... and training goes on from there on the new world size.
    summaries = run_ranks(_train, second, _overrides(prefix, out, **{"train.steps": 6}), timeout=300)
    assert summaries[0]["steps"] == 6 and summaries[0]["world_size"] == second
    meta = json.loads((_latest(out) / "meta.json").read_text())
    assert meta["world_size"] == second and meta["step"] == 6


def test_keep_last_and_fine_tune_from_a_backbone_file(dataset, tmp_path):
    prefix, _ = dataset
    out = tmp_path / "run"
    run_ranks(_train, 1, _overrides(prefix, out, **{"train.steps": 6, "checkpoint.every_steps": 2,
                                                    "checkpoint.keep_last": 2}), timeout=300)
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]
    weights = _latest(out) / "backbone.safetensors"
    # A new run (new folder, new head, even another class count) starting from those backbone weights.
    tuned = tmp_path / "tuned"
    loaded = run_ranks(_load_only, 1, _overrides(prefix, tuned, **{"checkpoint.init_backbone": str(weights),
                                                                  "head.num_classes": 60}), timeout=300)
    assert loaded[0]["step"] == 0 and loaded[0]["weight"].shape[0] == 60
    start = run_ranks(_backbone_state, 1, _overrides(prefix, tuned, **{"checkpoint.init_backbone": str(weights)}),
                      timeout=300)[0]
    saved = load_file(str(weights))
    assert all(torch.equal(start[k], saved[k]) for k in saved)


def _backbone_state(rank: int, world_size: int, overrides: list[str]) -> dict:
    from launcher.config import load_config
    from launcher.distributed import init_distributed
    from launcher.trainer.components import build

    cfg = load_config(None, overrides)
    ctx = init_distributed("gloo")
    c = build(cfg, ctx, 48)
    return {k: v.detach().clone() for k, v in c.engine.module.state_dict().items()}
