"""Settings next to the defaults train what they say (issue 12, items 6, 7, 9-12), under DDP and DeepSpeed.

Small on purpose (tiny backbone, 32 px, a few steps); each DeepSpeed launch is grouped with several checks.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.support.distributed import run_ranks
from tests.support.runs import _head_matrix, _latest, _overrides, _train

pytestmark = pytest.mark.multiprocess

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def expected_lr(base: float, step: int, steps: int, warmup: int, power: float = 2.0) -> float:
    """The LR step ``step`` (1-based) runs at: linear warm-up from base/(warmup+1), then (1 - t/T)^power."""
    done = step - 1
    if done < warmup:
        return base * (1 / (warmup + 1) + (1 - 1 / (warmup + 1)) * done / warmup)
    t, total = min(done - warmup, steps - warmup), steps - warmup
    return base * (1 - t / total) ** power


def _rows(out: Path) -> dict[int, dict]:
    """metrics.jsonl by step (training rows only; evaluation rows carry val_* keys)."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "lr" in r}


def _backbone(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "backbone.safetensors"))


def _pfc_eval(model: Path, val_bin: Path, tmp: Path) -> dict:
    from launcher.cli import app

    res = tmp / f"eval_{model.name}.json"
    result = CliRunner().invoke(app, ["eval", str(model), "--bin", str(val_bin), "--json", str(res),
                                         "--device", "cpu"])  # the device training evaluated on
    assert result.exit_code == 0, result.output
    return json.loads(res.read_text())[val_bin.name]


def _check_extension(out: Path, base: float, first: int, total: int, warmup: int) -> None:
    """Steps first+1..total ran at the new config's LR, and the backbone and head moved to the end."""
    rows = _rows(out)
    for s in range(first + 1, total + 1):
        assert rows[s]["lr"] == pytest.approx(expected_lr(base, s, total, warmup), rel=1e-9), (s, rows[s]["lr"])
    ckpts = out / "checkpoints"
    before, after = ckpts / f"step_{total - 2:08d}", ckpts / f"step_{total:08d}"
    a, b = _backbone(before), _backbone(after)
    assert sum(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point()) > len(a) // 2
    assert not torch.equal(_head_matrix(before)[0], _head_matrix(after)[0])
    # What the run folder records is what was in effect.
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == base
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == total
    meta = json.loads((after / "meta.json").read_text())
    assert meta["config"]["optim"]["lr"] == base and meta["config"]["train"]["steps"] == total


def test_ddp_lr_eval_and_extension(dataset, tmp_path):
    """Items 12 (logged lr), 9 (evaluation on 2 ranks = pfc eval of the checkpoint), 7 (extend, new lr)."""
    prefix, val_bin = dataset
    out = tmp_path / "run"
    common = {"checkpoint.every_steps": 2, "log.every_steps": 1, "optim.warmup_steps": 2,
              "data.val_bins": [str(val_bin)], "eval.every_steps": 4, "checkpoint.keep_last": 5}
    summaries = run_ranks(_train, 2, _overrides(prefix, out, **{"train.steps": 4, **common}), timeout=300)
    rows = _rows(out)
    assert [rows[s]["lr"] for s in range(1, 5)] == pytest.approx([expected_lr(0.05, s, 4, 2) for s in range(1, 5)],
                                                                rel=1e-9)
    assert all("loss_avg" in rows[s] for s in rows)
    in_training = summaries[0]["eval"][val_bin.name]
    assert summaries[1]["eval"][val_bin.name]["accuracy"] == in_training["accuracy"]
    saved = _pfc_eval(_latest(out), val_bin, tmp_path)
    assert _latest(out).name == "step_00000004"
    assert (in_training["accuracy"], in_training["accuracy_std"]) == (saved["accuracy"], saved["accuracy_std"])
    # Extend to 8 steps with another LR: steps 5-8 follow the schedule of the new config.
    run_ranks(_train, 2, _overrides(prefix, out, **{"train.steps": 8, "optim.lr": 0.02, **common}), timeout=300)
    _check_extension(out, 0.02, 4, 8, 2)


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [1, pytest.param(2, marks=pytest.mark.slow)])  # ZeRO-2: engine tests too
def test_deepspeed_accum_eval_extension_on_another_rank_count(dataset, tmp_path, stage):
    """DeepSpeed: items 8 (grad_accum 2 steps every step), 12, 9, then 7 and 10 (resumed on 1 rank,
    extended, another LR: the schedule is restored from the step reached)."""
    if not HAS_DEEPSPEED:
        pytest.skip("deepspeed not installed")
    prefix, val_bin = dataset
    out = tmp_path / "run"
    common = {"checkpoint.every_steps": 2, "log.every_steps": 1, "optim.warmup_steps": 2,
              "data.val_bins": [str(val_bin)], "eval.every_steps": 4, "checkpoint.keep_last": 5,
              "dist.engine": "deepspeed", "dist.zero_stage": stage, "optim.grad_accum": 2}
    summaries = run_ranks(_train, 2, _overrides(prefix, out, **{"train.steps": 4, **common}), timeout=400)
    rows = _rows(out)
    assert [rows[s]["lr"] for s in range(1, 5)] == pytest.approx([expected_lr(0.05, s, 4, 2) for s in range(1, 5)],
                                                                rel=1e-9)
    # Every step moved the backbone (DeepSpeed counts micro-batches: it used to step every other one).
    ckpts = out / "checkpoints"
    first, second = _backbone(ckpts / "step_00000002"), _backbone(ckpts / "step_00000004")
    assert sum(not torch.equal(first[k], second[k]) for k in first if first[k].is_floating_point()) > len(first) // 2
    in_training = summaries[0]["eval"][val_bin.name]
    saved = _pfc_eval(_latest(out), val_bin, tmp_path)
    assert (in_training["accuracy"], in_training["accuracy_std"]) == (saved["accuracy"], saved["accuracy_std"])
    run_ranks(_train, 1, _overrides(prefix, out, **{"train.steps": 8, "optim.lr": 0.02, **common}), timeout=400)
    _check_extension(out, 0.02, 4, 8, 2)


def _train_logged(rank: int, world_size: int, overrides: list[str]) -> dict:
    """_train, also returning what the 'pfc' logger said on this rank."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("pfc")
    logger.setLevel(logging.INFO)
    logger.addHandler(Keep())
    try:
        summary = _train(rank, world_size, overrides)
    except Exception as e:  # the message is what is checked
        return {"error": f"{type(e).__name__}: {e}", "log": records}
    return {"summary": summary, "log": records}


def test_amp_on_cpu_bf16_runs_autocast_fp16_is_refused(dataset, tmp_path):
    """Item 6: bf16 autocast runs on CPU (the loss moves off the fp32 value, a little); fp16 is refused."""
    prefix, _ = dataset
    common = {"train.steps": 1, "optim.warmup_steps": 1, "checkpoint.every_steps": 1, "log.every_steps": 1}
    losses = {}
    for amp in ("none", "bf16"):
        run_ranks(_train, 1, _overrides(prefix, tmp_path / amp, **{"train.amp": amp, **common}), timeout=300)
        losses[amp] = _rows(tmp_path / amp)[1]["loss"]
    assert losses["bf16"] != losses["none"] and losses["bf16"] == pytest.approx(losses["none"], rel=0.05)
    res = run_ranks(_train_logged, 1, _overrides(prefix, tmp_path / "fp16", **{"train.amp": "fp16", **common}),
                    timeout=300)[0]
    assert "train.amp=fp16 needs a CUDA device" in res["error"]
    assert not (tmp_path / "fp16" / "config.yaml").exists()


@pytest.mark.deepspeed
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed")
def test_deepspeed_bf16_on_cpu_trains(dataset, tmp_path):
    """Item 11: DeepSpeed bf16 on CPU used to crash at step 1 (bf16 weights, fp32 inputs)."""
    prefix, _ = dataset
    out = tmp_path / "ds_bf16"
    s = run_ranks(_train, 2, _overrides(prefix, out, **{"train.steps": 2, "checkpoint.every_steps": 2,
                                                         "dist.engine": "deepspeed", "dist.zero_stage": 1,
                                                         "train.amp": "bf16", "log.every_steps": 1}),
                  timeout=400)
    assert s[0]["steps"] == 2 and s[0]["skipped_nonfinite"] == 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _rows(out).values())


def test_resume_refusals_and_init_backbone(dataset, tmp_path):
    """Item 11: DiscFace off on resume is refused naming head.discface_lambda (it was a zip() error);
    a setting the state is tied to is refused by name; init_backbone with a checkpoint to resume from
    logs that the checkpoint wins, and it does."""
    prefix, _ = dataset
    out = tmp_path / "run"
    run_ranks(_train, 1, _overrides(prefix, out, **{"train.steps": 2, "checkpoint.every_steps": 2}), timeout=300)
    config_before = (out / "config.yaml").read_text()
    res = run_ranks(_train_logged, 1, _overrides(prefix, out, **{"train.steps": 4, "head.discface_lambda": 0.0}),
                    timeout=300)[0]
    assert "head.discface_lambda is 0.1 in the checkpoint, 0.0 now" in res["error"], res["error"]
    res = run_ranks(_train_logged, 1, _overrides(prefix, out, **{"train.steps": 4, "optim.name": "adamw",
                                                               "train.seed": 6}), timeout=300)[0]
    assert "optim.name is 'sgd' in the checkpoint, 'adamw' now" in res["error"], res["error"]
    assert "train.seed is 5 in the checkpoint, 6 now" in res["error"], res["error"]
    assert (out / "config.yaml").read_text() == config_before  # nothing recorded that did not take effect
    # Fine-tuning weights named on a run folder that holds a checkpoint: the checkpoint wins, and says so.
    other = tmp_path / "other"
    run_ranks(_train, 1, _overrides(prefix, other, **{"train.steps": 1, "optim.warmup_steps": 1,
                                                      "checkpoint.every_steps": 1}), timeout=300)
    weights = _latest(other) / "backbone.safetensors"
    res = run_ranks(_train_logged, 1, _overrides(prefix, out, **{"train.steps": 3, "checkpoint.every_steps": 3,
                                                               "checkpoint.init_backbone": str(weights)}),
                    timeout=300)[0]
    assert "summary" in res, res.get("error")
    assert not any(m.startswith("fine-tuning") for m in res["log"]), res["log"]
    assert any("is not loaded: the run resumes from its own checkpoint" in m for m in res["log"]), res["log"]
    assert any("resumed from" in m and "at step 2" in m for m in res["log"])
