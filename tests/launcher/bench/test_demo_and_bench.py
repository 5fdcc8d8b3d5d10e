"""The README's main command (`pfc demo`, through torchrun) on a tiny budget, and `pfc bench train`'s summary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from launcher.bench.train_speed import summarise


@pytest.mark.multiprocess
def test_demo_runs_end_to_end_through_torchrun(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "demo", "--output", str(out), "--identities", "24",
         "--images-per-identity", "6", "--steps", "6", "--set", "train.batch_size=16",
         "--set", "log.every_steps=2", "--set", "eval.every_steps=6"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "trained" in proc.stdout and "untrained" in proc.stdout
    report = json.loads((out / "eval.json").read_text())
    assert set(report) >= {"untrained", "trained", "checkpoint"}
    assert 0.0 <= report["trained"]["synth_val.bin"]["accuracy"] <= 1.0
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "roc_synth_val.png", "summary.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"


def test_bench_train_summary_uses_medians_after_warmup():
    rows = [{"step": s, "time": 10.0 + 0.5 * s + (5.0 if s == 2 else 0.0), "loss": 1.0, "time_data_s": 0.1,
             "time_forward_s": 0.2 if s > 3 else 9.0, "time_backward_s": 0.15, "time_comm_s": 0.01,
             "time_optimizer_s": 0.04} for s in range(1, 12)]
    res = summarise(rows, warmup=3, global_batch=64)
    assert res["step_s"] == pytest.approx(0.5)
    assert res["images_per_s"] == pytest.approx(128.0)
    assert res["split_s"]["time_forward_s"] == pytest.approx(0.2)
    assert res["steps_timed"] == 7
    with pytest.raises(ValueError, match="at least 2 logged steps"):
        summarise(rows[:4], warmup=3, global_batch=64)


def test_backbone_floor_times_forward_backward_on_device_made_batches():
    """`pfc bench train --floor`'s reference: the backbone alone on uint8 batches made on the device."""
    from launcher.bench.train_speed import backbone_floor

    sets = ["model.backbone=tiny", "model.image_size=16", "model.embedding_size=16", "train.batch_size=4",
            'train.amp="bf16"', "train.channels_last=true"]
    r = backbone_floor("demo_cpu", sets, steps=2, warmup=1)
    assert r["images_per_s"] > 0 and r["step_s"] > 0 and r["steps_timed"] == 2
    assert r["batch"] == 4 and r["image_size"] == 16 and r["amp"] == "bf16" and r["backbone"] == "tiny"
    # on the CPU: no CUDA allocator to read, channels_last and autocast stay off as in the trainer
    assert r["device"] == "cpu" and r["peak_memory_bytes"] is None and r["channels_last"] is False
    assert r["kernels"] == {"deterministic": False, "cudnn_benchmark": None}  # the trainer's kernel settings
    det = backbone_floor("demo_cpu", [*sets, "train.deterministic=true"], steps=1, warmup=0)
    assert det["kernels"] == {"deterministic": True, "cudnn_benchmark": None, "nondeterministic_ops": []}
    assert not torch.are_deterministic_algorithms_enabled()  # the process's own setting, back after it
