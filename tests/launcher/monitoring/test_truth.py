"""Exported and logged values stay true off the default path, from real runs (gloo on CPU).

Each rank's own ``/metrics`` is scraped over HTTP as its exporter closes, and the images it trained on
are counted as its loader hands them over. Two ranks with ``optim.grad_accum=2`` and a real NaN loss on
rank 1 (``PFC_FAULT=nan``): the dashboard's non-finite panel, evaluated by promtool on the scraped values,
counts that one skipped step once, not once per rank. One rank on a dataset with corrupt records
(``data.skip_corrupt``), DiscFace off and a slow evaluation (``PFC_FAULT=slow``): the samples counter holds
the images really trained on, ``metrics.jsonl``'s images/s leaves the evaluation out, its discrepancies are
the last measured (the exporter's), and no xi is logged.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from launcher.trainer.progress import ProgressLogger
from tests.launcher.monitoring.helpers import dashboard_queries, free_port, need_binary, substitute
from tests.support.distributed import run_ranks

pytestmark = pytest.mark.multiprocess

IMAGE = 32
BATCH = 8
ACCUM = 2
STEPS = 4


def _train_and_scrape(rank: int, world_size: int, overrides: list[str], fault: str, out: str) -> dict[str, Any]:
    """Train; return the summary and the images this rank's loader handed over; write ``rank<k>.prom``,
    what this rank's endpoint served just before it closed."""
    from launcher.config import load_config
    from launcher.distributed import init_distributed
    from launcher.trainer import batches, callbacks, faults
    from launcher.trainer.loop import train

    os.environ["PFC_FAULT"] = fault  # read at import: the forkserver's children share its environment
    faults._FAULT = faults.active_fault()
    images = [0]
    next_batch = batches.TrainData.next_batch

    def counted(self: Any) -> Any:
        batch = next_batch(self)
        images[0] += len(batch[1])
        return batch

    class Scraped(callbacks.TrainingMetrics):
        def close(self) -> None:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                Path(out, f"rank{rank}.prom").write_bytes(r.read())
            super().close()

    batches.TrainData.next_batch = counted  # type: ignore[method-assign]
    callbacks.TrainingMetrics = Scraped  # type: ignore[misc]
    summary = train(load_config(None, overrides), init_distributed("gloo"))
    return {"summary": summary, "images": images[0]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from data_pipeline.synth import generate

    prefix = tmp_path_factory.mktemp("synth") / "train"
    # few identities: classes repeat within a batch, so the discrepancies are defined
    generate(prefix, 8, 12, image_size=IMAGE, val_identities=24, val_pairs=240, seed=1, workers=1)
    return prefix


def _corrupt_copy(prefix: Path, folder: Path) -> Path:
    """The dataset with every third image's JPEG overwritten (undecodable: skipped with skip_corrupt)."""
    from data_pipeline.insightface import InsightFaceReader

    folder.mkdir()
    for f in prefix.parent.iterdir():
        shutil.copy(f, folder / f.name)
    bad = folder / prefix.name
    reader = InsightFaceReader(bad)
    offsets = [reader.offset(k) for k in reader.image_keys[::3]]
    reader.close()
    with open(f"{bad}.rec", "r+b") as f:
        for off in offsets:
            f.seek(off + 8 + 24)  # magic, lrec, IRHeader: then the JPEG
            f.write(b"\x00" * 64)
    return bad


def _run(prefix: Path, out: Path, world_size: int, fault: str, **extra: object) -> list[dict[str, Any]]:
    sets = {"data.prefix": str(prefix), "output": str(out / "run"), "data.workers": 0, "model.backbone": "tiny",
            "model.image_size": IMAGE, "model.embedding_size": 32, "train.batch_size": BATCH,
            "train.steps": STEPS, "optim.grad_accum": ACCUM, "head.sample_rate": 0.5, "log.every_steps": 1,
            "checkpoint.every_steps": 100, "metrics.enabled": True, "metrics.port_base": free_port(world_size),
            **extra}
    out.mkdir()
    return run_ranks(_train_and_scrape, world_size, [f"{k}={json.dumps(v)}" for k, v in sets.items()], fault,
                     str(out), timeout=240)


def _samples(path: Path) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(path.read_text())
            for s in fam.samples]


def _value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    hits = [v for n, lab, v in samples if n == name and labels.items() <= lab.items()]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


def _promtool_expr_test(series: list[dict[str, str]], expect: list[dict[str, Any]], tmp: Path) -> None:
    """promtool evaluates each expression of ``expect`` on ``series`` (one sample a minute)."""
    tests = {"evaluation_interval": "1m",
             "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": expect}]}
    (tmp / "panel_test.yml").write_text(yaml.safe_dump(tests))
    r = subprocess.run([need_binary("promtool"), "test", "rules", "panel_test.yml"], cwd=tmp, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_two_ranks_with_accumulation_and_a_nan_step(dataset, tmp_path):
    results = _run(dataset, tmp_path / "two", 2, "nan:3:1")
    scraped = {rank: _samples(tmp_path / "two" / f"rank{rank}.prom") for rank in (0, 1)}
    run_id = (tmp_path / "two" / "run" / "run_id").read_text().strip()
    for rank, samples in scraped.items():
        # grad_accum batches per optimizer step: every image counted once, every optimizer step once
        assert _value(samples, "pfc_samples_total") == results[rank]["images"] == STEPS * BATCH * ACCUM
        assert _value(samples, "pfc_steps_total") == STEPS == _value(samples, "pfc_training_step")
        # rank 1's NaN made every rank skip step 3: each rank counts it
        assert _value(samples, "pfc_nonfinite_steps_total", cause="loss") == 1.0
    assert results[0]["summary"]["skipped_nonfinite"] == 1

    # the dashboard's panel on what Prometheus scraped (counters born at 0, the skip between minutes 1 and 2)
    expr = next(q for title, q in dashboard_queries() if "pfc_nonfinite_steps_total" in q)
    expr = substitute(expr).replace("[5s]", "[5m]")
    series = [{"series": "pfc_nonfinite_steps_total{" + ", ".join(
                   f'{k}="{v}"' for k, v in {**lab, "job": "pfc", "instance": f"rank{rank}"}.items()) + "}",
               "values": f"0 0 {v:g} {v:g} {v:g}"}
              for rank, samples in scraped.items() for n, lab, v in samples if n == "pfc_nonfinite_steps_total"]
    expect = [{"expr": expr, "eval_time": "4m", "exp_samples": [
        {"labels": f'{{cause="loss", run="{run_id}"}}', "value": 1},
        {"labels": f'{{cause="gradient", run="{run_id}"}}', "value": 0}]}]
    _promtool_expr_test(series, expect, tmp_path)


def test_one_rank_with_corrupt_records_discface_off_and_a_slow_evaluation(dataset, tmp_path):
    from data_pipeline.synth import default_val_bin
    from launcher.trainer.faults import SLOW_PHASE_S

    bad = _corrupt_copy(dataset, tmp_path / "bad")
    result, = _run(bad, tmp_path / "one", 1, "slow:2", **{
        "data.skip_corrupt": True, "head.discface_lambda": 0.0, "data.val_bins": [str(default_val_bin(bad))],
        "eval.every_steps": 2, "eval.discrepancy_every_steps": 1})
    samples = _samples(tmp_path / "one" / "rank0.prom")
    skipped = result["summary"]["skipped_records"]
    assert skipped > 0 and _value(samples, "pfc_data_skipped_records_total") == skipped
    # the images trained on: each batch short by the records its loader skipped
    assert _value(samples, "pfc_samples_total") == result["images"] == STEPS * BATCH * ACCUM - skipped

    rows = [json.loads(x) for x in (tmp_path / "one" / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(steps) == list(range(1, STEPS + 1))
    # images/s of the steps: the 5 s evaluation after step 2 is no step's time. Each row's images/s is over
    # the steps so far (fewer than the 20-step window), so rows 2 and 3 give step 3's own wall time; less its
    # timed phases, what is left is the untimed rest of the step, which would hold the whole 5 s sleep. (Not
    # a bound on the steps' own time: on a loaded 2-core machine four of them took 5.7 s.)
    # each row's images: the step's batches less the records skipped (one rank here), summing to the counter's
    assert sum(r["images"] for r in steps.values()) == result["images"]
    assert min(r["images"] for r in steps.values()) < BATCH * ACCUM
    seen = {s: sum(steps[k]["images"] for k in steps if k <= s) for s in steps}
    mean = {s: seen[s] / s / r["images_per_s"] for s, r in steps.items()}
    step3 = 3 * mean[3] - 2 * mean[2]
    untimed = step3 - sum(v for k, v in steps[3].items() if k.startswith("time_") and k != "time_comm_s")
    assert untimed < SLOW_PHASE_S, (step3, steps[3])
    # the discrepancies are the last measured, as the exporter's (they change from step to step)
    logged = [steps[s]["discrepancy_directional_deg"] for s in sorted(steps) if "discrepancy_directional_deg"
              in steps[s]]
    assert len(set(logged)) >= 2, logged
    assert logged[-1] == pytest.approx(math.degrees(_value(samples, "pfc_discrepancy_directional_radians")),
                                       rel=1e-9)
    # DiscFace off: no xi anywhere (the trainer's 0.0 is no norm)
    assert not any("xi_norm" in r or "loss_disc" in r for r in rows), rows[-1]
    assert not any(n.startswith("pfc_discface_xi_norm") for n, _, _ in samples)


def test_eta_counts_the_evaluations_the_step_window_forgot():
    """An evaluation after step 1, then 24 quick steps (the 20-step window no longer holds it): the ETA
    still spreads its time over the steps, and images/s is that of the steps alone."""
    p = ProgressLogger(total_steps=100, global_batch=8, device=torch.device("cpu"), jsonl=None, enabled=False)
    p.tick()
    time.sleep(0.5)
    evaluated = time.perf_counter()
    p.not_step_time()  # the evaluation's end
    # the next step's time starts after the evaluation (no bound on how long a step takes on a loaded machine)
    assert p.tick() <= time.perf_counter() - evaluated
    for _ in range(23):
        p.tick()
    assert p.overhead_s >= 0.5 and p.eta_s(25) >= 75 * 0.5 / 25


def test_images_per_s_counts_the_images_the_steps_trained_on(monkeypatch):
    """A step short by skipped corrupt records (on any rank) trained on fewer images: images/s is the images
    of the window's steps over their time, not the nominal global batch's."""
    clock = iter([0.0, 1.0, 3.0, 4.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    p = ProgressLogger(total_steps=10, global_batch=16, device=torch.device("cpu"), jsonl=None, enabled=False)
    p.tick(16)
    p.tick(10)  # 6 records skipped: a 2 s step of 10 images
    assert p.images_per_s() == pytest.approx(26 / 3)
    p.tick()  # no count given: the nominal batch
    assert p.images_per_s() == pytest.approx(42 / 4)


def test_a_failed_save_is_no_steps_time_for_the_log_or_the_exporter():
    """A save that fails (a full disk: the run logs it and goes on) took its time outside any step, as a
    save that succeeds does; it was counted in the next step's duration (images/s, the step histogram)."""
    import types

    from launcher.config import MetricsConfig
    from launcher.monitoring.exporter import TrainingMetrics
    from launcher.trainer.callbacks import RunCallbacks
    from launcher.trainer.checkpoint_files import CheckpointWriteError

    progress = ProgressLogger(total_steps=10, global_batch=8, device=torch.device("cpu"), jsonl=None, enabled=False)
    metrics = TrainingMetrics(MetricsConfig(enabled=True), rank=0, local_rank=0, node=0, world_size=1)
    calls = types.SimpleNamespace(watchdog=None, ctx=types.SimpleNamespace(rank=0), progress=progress,
                                  metrics=metrics)
    progress.tick()
    with pytest.raises(CheckpointWriteError), RunCallbacks.long_phase(calls, 2):
        time.sleep(0.3)
        failed = time.perf_counter()
        raise CheckpointWriteError("checkpoint for step 2 was not written: [Errno 28] No space left on device")
    # the next step's time starts after the failed save, not before its 0.3 s (whatever a step takes under load)
    assert progress.tick() <= time.perf_counter() - failed
    metrics.observe_step(3, {}, images=8, sampled_classes=0, skipped_records=0)
    took = [s.value for m in metrics.registry.collect() for s in m.samples if s.name == "pfc_step_duration_seconds_sum"]
    assert len(took) == 1 and took[0] <= time.perf_counter() - failed
