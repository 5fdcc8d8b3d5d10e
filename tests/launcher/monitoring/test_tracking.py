"""Experiment tracking (``log.backends``, launcher/monitoring/trackers.py): TensorBoard event files and W&B offline run
files read back."""

from __future__ import annotations

import json
import socket
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from tests.support.distributed import run_ranks
from tests.support.runs import _overrides, _train


@pytest.mark.multiprocess
def test_tensorboard_event_files_hold_the_logged_scalars_evaluations_and_roc(dataset, tmp_path):
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


def _wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a ``.wandb`` run file, checksums verified.

    The format (wandb-core's store, the one ``wandb sync`` reads): a 7-byte header (``:W&B``, magic 0xBEE1,
    version 0), then the LevelDB log layout: 32 KiB blocks of chunks, each ``crc32 (seeded with the type
    byte) u32, length u16, type u8`` (1 full, 2 first, 3 middle, 4 last), a block tail under 7 bytes padded.
    wandb 0.31 ships no Python reader (the old ``wandb.sdk.internal.datastore`` is gone), hence this one.
    """
    from wandb.proto import wandb_internal_pb2

    pb: Any = wandb_internal_pb2  # generated protobuf module: no type stubs

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), data[:7]
    block, head = 32768, 7
    pos, pending, records = head, b"", []
    while pos + head <= len(data):
        if block - pos % block < head:  # padding at a block's end
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + head])
        if kind == 0 and length == 0:  # zero-filled rest of a block
            pos += block - pos % block
            continue
        chunk = data[pos + head:pos + head + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {pos}"
        pos += head + length
        pending += chunk
        assert kind in (1, 2, 3, 4), kind
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    assert pos == len(data) or not data[pos:].strip(b"\0"), f"{path}: {len(data) - pos} trailing bytes unread"
    return records


@pytest.mark.multiprocess
def test_wandb_offline_run_files_hold_the_logged_scalars_evaluations_and_roc(dataset, tmp_path,
                                                                               monkeypatch):
    pytest.importorskip("wandb", reason="the tracking extra is not installed (CI installs it)")
    # Any HTTP from wandb would go to this listener (its API address); offline mode must never connect.
    # (This sandbox cannot reach wandb.ai either: a connection attempt there would fail or hang the run.)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)

    prefix, val_bin = dataset
    out = tmp_path / "run"
    sets = _overrides(prefix, out, **{"train.steps": 8, "log.every_steps": 2, "eval.every_steps": 4,
                                      "checkpoint.every_steps": 1000, "data.val_bins": [str(val_bin)],
                                      "log.backends": ["jsonl", "wandb"], "log.wandb_project": "pfc-test"})
    try:
        summaries = run_ranks(_train, 2, sets, timeout=300)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing connected
    finally:
        listener.close()

    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # rank 0 only, offline
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1, files
    records = _wandb_records(files[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "exit" in kinds, kinds  # the run was finished
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "pfc-test"
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["train"]["steps"] == 8 and config["log"]["backends"] == ["jsonl", "wandb"], config["log"]
    rows: dict[int, dict[str, Any]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = rows.setdefault(r.history.step.num, {})
            for item in r.history.item:  # a media value comes as nested keys: (name, field)
                path = [item.key] if item.key else list(item.nested_key)
                node = row
                for part in path[:-1]:
                    node = node.setdefault(part, {})
                node[path[-1]] = json.loads(item.value_json)
    assert sorted(rows) == [2, 4, 6, 8], sorted(rows)
    # the same values, at the same steps, as metrics.jsonl (the jsonl backend still runs alongside)
    jsonl = {rec["step"]: rec for rec in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "loss" in rec}
    assert sorted(jsonl) == [2, 4, 6, 8]
    for step, rec in jsonl.items():
        assert rows[step]["train/loss"] == pytest.approx(rec["loss"], rel=1e-6)
        assert rows[step]["train/lr"] == pytest.approx(rec["lr"], rel=1e-6)
    lr = {s: rows[s]["train/lr"] for s in rows}
    assert lr[2] < lr[4] and lr[4] > lr[6] > lr[8]
    assert rows[8]["train/loss"] == pytest.approx(summaries[0]["final"]["loss"], rel=1e-6)
    ds = Path(val_bin).stem
    assert [s for s in sorted(rows) if f"val/{ds}/accuracy" in rows[s]] == [4, 8]
    assert rows[8][f"val/{ds}/accuracy"] == pytest.approx(summaries[0]["eval"][Path(val_bin).name]["accuracy"],
                                                          rel=1e-6)
    assert f"val/{ds}/accuracy_std" in rows[4]
    assert any(k.startswith(f"val/{ds}/tar_far_") for k in rows[4])
    for step in (4, 8):
        assert f"val/{ds}/roc" in rows[step], rows[step]
        roc = rows[step][f"val/{ds}/roc"]
        assert roc["_type"] == "image-file" and roc["width"] > 100 and roc["height"] > 100, roc
        assert (runs[0] / "files" / roc["path"]).is_file(), roc


def test_backends_refused_at_config_time_with_a_reason():
    from launcher.config import ConfigError, load_config

    assert load_config(None, ["log.backends=[jsonl, tensorboard, jsonl]"]).log.backends == ["jsonl", "tensorboard"]
    assert load_config(None, ["log.backends=[wandb]"]).log.backends == ["wandb"]
    with pytest.raises(ConfigError, match=r"unknown logging backend 'csv'"):
        load_config(None, ["log.backends=[csv]"])
    with pytest.raises(ConfigError, match=r"log.wandb_mode"):
        load_config(None, ["log.wandb_mode=disabled"])
    with pytest.raises(ConfigError, match=r"log.wandb_project"):
        load_config(None, ["log.wandb_project=a/b"])
    assert load_config(None, ["log.wandb_mode=online"]).log.wandb_mode == "online"


def test_wandb_online_without_an_api_key_stops_before_any_login(tmp_path, monkeypatch):
    """``log.wandb_mode=online`` is used only when asked, and then never prompts: no key, one clear line."""
    pytest.importorskip("wandb", reason="the tracking extra is not installed (CI installs it)")
    from launcher.monitoring.trackers import Trackers, check_backends

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match=r"log.wandb_mode=online needs WANDB_API_KEY"):
        check_backends(["jsonl", "wandb"], "online")
    # every rank checks (rank 0 and the others alike), before anything is written
    with pytest.raises(RuntimeError, match=r"WANDB_API_KEY"):
        Trackers(["wandb"], tmp_path / "run", enabled=False, wandb_mode="online")
    assert not (tmp_path / "run").exists()
    check_backends(["jsonl", "wandb"], "offline")  # offline needs no key


def test_jsonl_stays_the_default(tmp_path):
    from launcher.config import load_config

    assert load_config(None, []).log.backends == ["jsonl"]
    json.dumps(load_config(None, []).model_dump(mode="json"))  # the config (with backends) serialises
