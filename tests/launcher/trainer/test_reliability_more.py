"""Issue 9, items 5-7: a node that never joins, a rank that hangs, corrupt or mismatched data mid-run,
and bad input (CLI arguments, checkpoints carrying pickled code, missing paths, too few classes).

Each test runs the real `pfc` entry point in a subprocess and injects the fault (``PFC_FAULT`` or a
damaged file), so the user-visible behaviour is what is checked: exit status and the message."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.runs import _descendants, _latest, _pfc, _train_args

pytestmark = pytest.mark.multiprocess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.pop("PFC_FAULT", None)
    env.update(extra)
    return env


def _no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]


# -- item 5: rendezvous and hung collectives ----------------------------------------------------------

# a node that never joins: tests/launcher/commands/test_rendezvous_one_line.py


def test_hung_rank_is_detected_within_the_timeout_and_named(dataset, tmp_path):
    prefix, _ = dataset
    timeout_s = 8
    args = [*_train_args(prefix, tmp_path / "run", **{"train.steps": 400, "checkpoint.every_steps": 1000,
                                                      "dist.timeout_s": timeout_s}), "--nproc-per-node", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(PFC_FAULT="stop:3:1"),
                            start_new_session=True)
    lines: list[str] = []
    found = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends when the job exits, or we stop reading once rank 0 has spoken
            lines.append(line)
            found = re.search(r"pfc: rank 0: no progress from rank 1 for (\d+) s .*?this rank has waited "
                              r"(\d+) s at step (\d+) \(dist\.timeout_s=8\)", line)
            if found:
                break
    finally:
        # The SIGSTOPped rank must not outlive the test (torchrun itself would SIGKILL it 30 s after
        # rank 0 exits): SIGKILL every process below the launcher, then the launcher's group.
        for pid in _descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stopped = []
    for pid in _descendants(1):
        with contextlib.suppress(OSError):
            if str(tmp_path) in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                stopped.append(pid)
    assert not stopped, f"ranks of this test still alive: {stopped}"
    out = "".join(lines)
    assert found, out[-4000:]
    waited = int(found.group(2))
    assert timeout_s - 3 <= waited <= timeout_s, f"detected after {waited}s with dist.timeout_s={timeout_s}"
    assert int(found.group(3)) == 3, "rank 0 should be waiting right after the last step rank 1 finished"
    assert "Timed out waiting" not in out, "the watchdog should speak before gloo's own timeout"
    print(f"SIGSTOP of rank 1 after step 3: rank 0 named it after {waited}s (dist.timeout_s={timeout_s})")


# -- item 6: corrupt data through `pfc train` ---------------------------------------------------------

def _copy_dataset(prefix: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in prefix.parent.iterdir():
        shutil.copy(f, dst / f.name)
    return dst / prefix.name


def _break_images(prefix: Path, every: int = 4) -> dict[int, int]:
    """Overwrite the JPEG bytes of every ``every``-th image record; returns {key: byte offset of the record}."""
    from data_pipeline.insightface import InsightFaceReader

    with InsightFaceReader(prefix) as reader:
        broken = {k: reader.offset(k) for k in reader.image_keys[every // 2::every]}
    with open(f"{prefix}.rec", "r+b") as f:
        for off in broken.values():
            f.seek(off + 8 + 24)  # chunk header (magic, length) and IRHeader, then the image
            f.write(b"\x00" * 64)
    return broken


def test_corrupt_record_stops_the_run_or_is_skipped_and_counted(dataset, tmp_path):
    prefix, _ = dataset
    bad = _copy_dataset(prefix, tmp_path / "bad")
    broken = _break_images(bad)  # 1 image in 4: the first batches of 16 (seeded order) meet some
    extra = {"train.steps": 3, "checkpoint.every_steps": 1000}
    r = _pfc(_train_args(bad, tmp_path / "stop", **extra))
    assert r.returncode != 0
    log = r.stdout + r.stderr
    m = re.search(r"key (\d+)", log[log.index(f"{bad}.rec"):] if f"{bad}.rec" in log else "")
    assert m and int(m.group(1)) in broken, log[-3000:]
    assert f"byte offset {broken[int(m.group(1))]}" in log, log[-3000:]
    assert not (tmp_path / "stop" / "summary.json").exists()
    r = _pfc(_train_args(bad, tmp_path / "skip", **extra, **{"data.skip_corrupt": True}))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["steps"] == 3 and 1 <= summary["skipped_records"] <= len(broken), summary
    print(f"corrupt records: stopped naming key {m.group(1)}; skip mode skipped {summary['skipped_records']}")


def test_index_that_does_not_match_the_record_file_is_refused_at_start(dataset, tmp_path):
    prefix, _ = dataset
    rows = [line.split("\t") for line in Path(f"{prefix}.idx").read_text().splitlines()]
    rec_size = Path(f"{prefix}.rec").stat().st_size
    cases = {
        # every offset moved 4 bytes: no record starts there
        "shifted": [(k, int(o) + 4) for k, o in rows],
        # the last offsets point past the end of the .rec (an index of a longer file)
        "past_end": [(k, int(o) + (rec_size if i >= len(rows) - 3 else 0)) for i, (k, o) in enumerate(rows)],
    }
    for name, entries in cases.items():
        bad = _copy_dataset(prefix, tmp_path / name)
        Path(f"{bad}.idx").write_text("".join(f"{k}\t{o}\n" for k, o in entries))
        t0 = time.monotonic()
        r = _pfc(_train_args(bad, tmp_path / f"run_{name}", **{"train.steps": 2}))
        assert r.returncode != 0, name
        log = r.stdout + r.stderr
        assert f"{bad}.idx" in log and "does not match" in log, (name, log[-3000:])
        assert not (tmp_path / f"run_{name}" / "checkpoints").exists(), "nothing may train on a bad index"
        print(f"{name}: refused in {time.monotonic() - t0:.1f}s")


# -- item 7: bad input --------------------------------------------------------------------------------

def _cli(argv: list[str]):  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from launcher.cli import app

    return CliRunner().invoke(app, argv)


def test_bad_command_line_arguments_give_a_clear_error_without_traceback(dataset, tmp_path):
    prefix, _ = dataset
    cases = [
        (["train", "demo_cpu", "--no-such-option"], "No such option"),
        (["train", "demo_cpu", "--nproc-per-node", "0"], "--nproc-per-node"),
        (["train", "demo_cpu", "--nproc-per-node", "two"], "--nproc-per-node"),
        (["train", "demo_cpu", "--rdzv-timeout", "0"], "--rdzv-timeout"),
        (["train", "demo_cpu", "--set", "train.steps=-3"], "train.steps"),
        (["train", "demo_cpu", "--set", "no_such.field=1"], "no_such"),
        (["train", "demo_cpu", "--set", "train.steps"], "train.steps"),
        (["train", "no_such_recipe"], "no_such_recipe"),
        (["eval", "model", "--bin", "x.bin", "--no-such-option"], "No such option"),
        (["eval", "model", "--bin", "x.bin", "--batch-size", "0"], "--batch-size"),
        (["eval", "model"], "--bin"),
        (["data", "inspect", str(prefix), "--bogus"], "No such option"),
        (["data", "synth", str(tmp_path / "s"), "--identities", "zero"], "--identities"),
        (["no-such-command"], "No such command"),
    ]
    for argv, expected in cases:
        r = _cli(argv)
        assert r.exit_code not in (0, 1), (argv, r.exit_code, r.output[-1000:])  # 1: an uncaught exception
        assert isinstance(r.exception, SystemExit), (argv, repr(r.exception))
        assert "Traceback" not in r.output
        assert expected in r.output, (argv, r.output[-1000:])


class _Payload:
    """Unpickling this runs ``Path(marker).touch()``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_checkpoint_with_pickled_code_is_refused_and_nothing_runs(dataset, tmp_path):
    prefix, _ = dataset
    out = tmp_path / "run"
    args = _train_args(prefix, out, **{"train.steps": 2, "checkpoint.every_steps": 2})
    r = _pfc(args)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = _latest(out)
    targets = [ckpt / "trainer_state.pt", *sorted(ckpt.glob("rank/rank_*.pt"))]
    assert len(targets) >= 2, sorted(p.name for p in ckpt.rglob("*"))
    resume = _train_args(prefix, out, **{"train.steps": 4, "checkpoint.every_steps": 2})
    for target in targets:
        saved = target.read_bytes()
        marker = tmp_path / f"pwned_{target.stem}"
        target.write_bytes(pickle.dumps({"state": _Payload(marker)}))
        r = _pfc(resume)
        assert r.returncode != 0
        log = r.stdout + r.stderr
        assert not marker.exists(), f"code in {target.name} ran"
        assert str(target) in log or target.name in log, log[-3000:]
        assert _latest(out) == ckpt, "training must not go on from a refused checkpoint"
        target.write_bytes(saved)


def test_paths_that_do_not_exist_are_named(dataset, tmp_path):
    prefix, val_bin = dataset
    missing = tmp_path / "missing"
    for argv, name in [
        (["train", str(missing / "config.yaml")], str(missing / "config.yaml")),
        (["eval", str(missing / "ckpt"), "--bin", str(val_bin)], str(missing / "ckpt")),
        (["data", "inspect", str(missing / "train")], str(missing / "train")),
    ]:
        r = _cli(argv)
        assert r.exit_code != 0, argv
        assert name in r.output + str(r.exception), (argv, r.output[-2000:], repr(r.exception))
    # through `pfc train`: refused at start, before any step
    for out, sets, name in [
        (tmp_path / "a", {"data.prefix": str(missing / "train")}, str(missing / "train")),
        (tmp_path / "b", {"data.val_bins": [str(missing / "lfw.bin")]}, str(missing / "lfw.bin")),
    ]:
        r = _pfc(_train_args(sets.pop("data.prefix", prefix), out, **sets), timeout=120)  # type: ignore[arg-type]
        assert r.returncode != 0
        assert name in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_dataset_with_more_classes_than_the_head_is_refused(dataset, tmp_path):
    prefix, _ = dataset
    r = _pfc(_train_args(prefix, tmp_path / "run", **{"head.num_classes": 40}))
    assert r.returncode != 0
    log = r.stdout + r.stderr
    assert f"head.num_classes=40 but the dataset {prefix} has 48 classes" in log, log[-2000:]
    # more head rows than the dataset's classes is fine (room for classes added later)
    r = _pfc(_train_args(prefix, tmp_path / "ok", **{"head.num_classes": 50, "train.steps": 2}))
    assert r.returncode == 0, r.stderr[-2000:]


def test_watchdog_tells_a_silent_rank_from_a_lagging_one():
    """The diagnosis itself, on an in-memory store: silent (stopped/dead) vs alive but behind."""
    import torch
    import torch.distributed as dist

    from launcher.distributed import DistContext
    from launcher.trainer.watchdog import HangWatchdog

    store = dist.HashStore()
    dogs = [HangWatchdog(DistContext(r, 3, r, 3, 0, torch.device("cpu"), "gloo"), 10.0, store=store,
                         interval_s=0.01) for r in range(3)]
    for d in dogs:
        d.progress(5)
        d._publish()
    dogs[0]._read_peers()
    time.sleep(0.2)
    dogs[1]._publish()  # rank 1 still beats, rank 2 went silent
    dogs[0]._read_peers()
    msg = dogs[0].diagnose()
    assert "no progress from rank 2 for" in msg and "at step 5" in msg and "rank 1" not in msg, msg
    # all alive, rank 1 behind: it is the one named
    dogs[0].progress(6)
    dogs[1].progress(4)
    for d in dogs:
        d._publish()
    dogs[0]._read_peers()
    msg = dogs[0].diagnose()
    assert "rank(s) 1: alive but stuck at step 4" in msg, msg
    assert dogs[0].deadline_s < 10.0, "must fire before the process group's own timeout"
