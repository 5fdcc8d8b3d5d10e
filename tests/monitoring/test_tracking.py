"""Experiment tracking (``log.backends``, launcher/tracking.py): TensorBoard event files read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed import run_ranks
from tests.launcher.test_training import _overrides, _train, dataset  # noqa: F401


@pytest.mark.multiprocess
def test_tensorboard_event_files_hold_the_logged_scalars_evaluations_and_roc(dataset, tmp_path):  # noqa: F811
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (CI installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prefix, val_bin = dataset
    out = tmp_path / "run"
    sets = _overrides(prefix, out, **{"train.steps": 8, "log.every_steps": 2, "eval.every_steps": 4,
                                      "checkpoint.every_steps": 1000, "data.val_bins": [str(val_bin)],
                                      "log.backends": ["tensorboard"]})
    summaries = run_ranks(_train, 2, sets, timeout=300)
    assert not (out / "metrics.jsonl").exists(), "jsonl was not asked for"
    files = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1, files  # rank 0 only
    acc = EventAccumulator(str(files[0]), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(loss) == [2, 4, 6, 8], loss
    lr = {e.step: e.value for e in acc.Scalars("train/lr")}
    assert sorted(lr) == [2, 4, 6, 8]
    # each step logs the LR it ran at: step 2 is the warm-up's last (2/3 of the peak), then the decay
    assert lr[2] < lr[4] and lr[4] > lr[6] > lr[8]
    # the last logged loss is the run summary's
    assert loss[8] == pytest.approx(summaries[0]["final"]["loss"], rel=1e-6)
    ds = Path(val_bin).stem
    accuracy = {e.step: e.value for e in acc.Scalars(f"val/{ds}/accuracy")}
    assert sorted(accuracy) == [4, 8]
    assert accuracy[8] == pytest.approx(summaries[0]["eval"][Path(val_bin).name]["accuracy"], rel=1e-6)
    assert f"val/{ds}/accuracy_std" in tags["scalars"]
    assert any(t.startswith(f"val/{ds}/tar_far_") for t in tags["scalars"])
    roc = acc.Images(f"val/{ds}/roc")
    assert [e.step for e in roc] == [4, 8] and roc[0].width > 100 and roc[0].height > 100


def test_backends_refused_at_config_time_with_a_reason():
    from launcher.config import ConfigError, load_config

    assert load_config(None, ["log.backends=[jsonl, tensorboard, jsonl]"]).log.backends == ["jsonl", "tensorboard"]
    with pytest.raises(ConfigError, match=r"log.backends.*wandb is not supported yet"):
        load_config(None, ["log.backends=[wandb]"])
    with pytest.raises(ConfigError, match=r"unknown logging backend 'csv'"):
        load_config(None, ["log.backends=[csv]"])


def test_jsonl_stays_the_default(tmp_path):
    from launcher.config import load_config

    assert load_config(None, []).log.backends == ["jsonl"]
    json.dumps(load_config(None, []).model_dump(mode="json"))  # the config (with backends) serialises
