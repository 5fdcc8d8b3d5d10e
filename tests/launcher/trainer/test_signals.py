"""A stop signal saves, then stops (launcher/trainer/preemption.py), with real signals and real ranks.

* SIGTERM to the ``pfc train --nproc-per-node 2`` process: every rank stops after the same step, a
  checkpoint exists at that step, the launcher exits 76 within a bound, no rank outlives it, and the
  resumed run ends bit-identical to an uninterrupted one.
* A configured signal (``train.stop_signals``) reaching one rank only: the all-reduce makes both stop.
* ``train.stop_grace_s``: ranks that do not stop are killed after the grace period, together with
  torchrun: ``--max-restarts`` starts no new attempt, and the launcher exits 77.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from launcher.trainer.preemption import (
    STOP_KILLED_EXIT_CODE,
    STOPPED_EXIT_CODE,
    SignalForwarder,
    child_pids,
    torchrun_stop_setup,
)
from tests.support.distributed import run_ranks
from tests.support.runs import _assert_same_run, _latest, _overrides, _train_args

pytestmark = pytest.mark.multiprocess

STEPS = 60


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.pop("PFC_FAULT", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _logged_step(out: Path) -> int:
    try:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return 0
    return max((r.get("step", 0) for r in rows), default=0)


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def test_sigterm_to_the_launcher_saves_at_the_step_reached_and_resume_is_exact(dataset, tmp_path):
    prefix, _ = dataset
    # data.workers=1: a DataLoader worker shares its rank's process group and must survive the signal too
    common = {"train.steps": STEPS, "checkpoint.every_steps": 1000, "data.workers": 1}
    clean, stopped = tmp_path / "clean", tmp_path / "stopped"
    launch = [*_train_args(prefix, stopped, **common), "--nproc-per-node", "2"]
    log = (tmp_path / "stopped.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", *launch], stdout=log, stderr=subprocess.STDOUT,
                            env=_env(), text=True)
    try:
        deadline = time.monotonic() + 240
        while _logged_step(stopped) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be signalled"
        at_signal = _logged_step(stopped)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        code = proc.wait(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    text = log.read()
    assert code == STOPPED_EXIT_CODE, text[-4000:]
    assert took < 30, f"the launcher needed {took:.1f}s to stop"
    summary = json.loads((stopped / "summary.json").read_text())
    step = summary["stopped"]["step"]
    assert summary["stopped"]["signal"] == "SIGTERM" and at_signal <= step < STEPS, summary
    # the checkpoint is at the step reached, and it is the only one (no periodic save happened)
    assert _latest(stopped).name == f"step_{step:08d}"
    assert [p.name for p in (stopped / "checkpoints").glob("step_*")] == [f"step_{step:08d}"]
    assert text.count(f"stopped after step {step}") == 2, text[-3000:]  # both ranks, same step
    assert "DataLoader worker" not in text, text[-3000:]
    assert not _processes_mentioning(str(stopped)), "a rank outlived the launcher"
    # resume to the end, and compare with a run that was never interrupted (both on 2 real gloo ranks,
    # started by the test harness: the same config, without the launcher's start-up time; its ranks are
    # daemons, which may not have DataLoader workers, and the batches do not depend on the worker count)
    common["data.workers"] = 0
    logged_before = len((stopped / "metrics.jsonl").read_text().splitlines())
    resumed = run_ranks(_train_recipe, 2, _overrides(prefix, stopped, **common), timeout=300)
    assert resumed[0]["steps"] == STEPS and resumed[0]["stopped"] is None
    # the resumed run logged from the step after the stop on (it started from that checkpoint, not from 0)
    rows = [json.loads(x) for x in (stopped / "metrics.jsonl").read_text().splitlines()[logged_before:]]
    assert rows and step < rows[0]["step"] <= step + 2, (step, rows[:1])
    run_ranks(_train_recipe, 2, _overrides(prefix, clean, **common), timeout=300)
    _assert_same_run(clean, stopped)
    print(f"SIGTERM after logged step {at_signal}: stopped after step {step}, launcher exited in {took:.2f}s")


def _train_recipe(rank: int, world_size: int, overrides: list[str]) -> dict:
    """One rank of `pfc train demo_cpu --set ...` (the recipe the launcher run used)."""
    from launcher.config import load_config, resolve_config_path
    from launcher.distributed import init_distributed
    from launcher.trainer.loop import train

    return train(load_config(resolve_config_path("demo_cpu"), overrides), init_distributed("gloo"))


def _train_signalled(rank: int, world_size: int, overrides: list[str]) -> dict:
    from launcher.config import load_config
    from launcher.distributed import init_distributed
    from launcher.trainer.loop import train

    cfg = load_config(None, overrides)
    ctx = init_distributed("gloo")
    if rank == 1:  # only rank 1 is signalled, from outside its main thread, once training runs
        out = Path(cfg.output)

        def later() -> None:
            while _logged_step(out) < 4:
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGUSR2)

        threading.Thread(target=later, daemon=True).start()
    return train(cfg, ctx)


def test_a_configured_signal_on_one_rank_stops_every_rank_at_the_same_step(dataset, tmp_path):
    prefix, _ = dataset
    out = tmp_path / "run"
    sets = _overrides(prefix, out, **{"train.steps": 400, "checkpoint.every_steps": 1000,
                                      "train.stop_signals": ["USR2"]})
    summaries = run_ranks(_train_signalled, 2, sets, timeout=300)
    s0, s1 = summaries[0]["stopped"], summaries[1]["stopped"]
    assert s0 == s1 and s0["signal"] == "SIGUSR2", summaries
    assert summaries[0]["steps"] == s0["step"] < 400
    assert _latest(out).name == f"step_{s0['step']:08d}"


def test_config_refuses_signals_that_cannot_trigger_a_save():
    from launcher.config import ConfigError, load_config

    assert load_config(None, ["train.stop_signals=[term, SIGUSR1, sigterm]"]).train.stop_signals == [
        "SIGTERM", "SIGUSR1"]
    with pytest.raises(ConfigError, match=r"train.stop_signals.*SIGKILL cannot be caught"):
        load_config(None, ["train.stop_signals=[SIGKILL]"])
    with pytest.raises(ConfigError, match=r"'NOPE' is not a signal name"):
        load_config(None, ["train.stop_signals=[NOPE]"])
    with pytest.raises(ConfigError, match=r"train.stop_grace_s"):
        load_config(None, ["train.stop_grace_s=0"])


_STUBBORN = """
import signal, subprocess, sys, time
# a stand-in for torchrun: one child that ignores SIGTERM (a rank that never reaches a step boundary)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"],
    stdout=subprocess.PIPE, text=True)
child.stdout.readline()
print('ready', flush=True)
print(child.wait(), flush=True)
"""


def _state(pid: int) -> str:
    """``ps``'s state letter of ``pid``; "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def test_stop_grace_kills_torchrun_with_the_ranks_that_do_not_stop(capfd):
    setup = torchrun_stop_setup(["SIGTERM", "SIGUSR1"])
    assert setup.torchrun_args == ["--signals-to-handle=SIGINT,SIGHUP,SIGQUIT"]
    proc = subprocess.Popen([sys.executable, "-c", _STUBBORN], stdout=subprocess.PIPE, text=True,
                            preexec_fn=setup.preexec)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        (rank,) = child_pids(proc.pid)
        with SignalForwarder(proc, ["SIGTERM"], grace_s=1.5) as fwd:
            t0 = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)  # the launcher (this process) is signalled
            os.kill(proc.pid, signal.SIGTERM)  # as SLURM does, to every process: the "torchrun" ignores it
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGTERM)  # a second one during the grace: a line, no second stop
            code = fwd.wait()
            took = time.monotonic() - t0
        assert fwd.forwarded == signal.SIGTERM
        # the "torchrun" ignored SIGTERM (preexec) and was SIGKILLed with its rank when the grace ran out
        assert code == STOP_KILLED_EXIT_CODE and proc.returncode == -signal.SIGKILL
        assert 1.5 <= took < 10, took
        assert _state(rank) in ("", "Z"), "the rank outlived the grace period"
        err = capfd.readouterr().err
        assert "SIGTERM ignored: already stopping on SIGTERM" in err, err
        assert "did not stop within train.stop_grace_s=1.5 s: killing torchrun and every rank" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _attempt(pid: int) -> str | None:
    """torchrun's attempt number in the environment of ``pid`` (a rank), None for other processes."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"TORCHELASTIC_RESTART_COUNT="):
            return item.split(b"=", 1)[1].decode()
    return None


def test_a_stop_past_its_grace_ends_the_launch_and_max_restarts_starts_no_new_attempt(dataset, tmp_path):
    """Ranks that cannot stop (rank 1 hangs, so rank 0 waits in an all-reduce and never reaches a step
    boundary) under `pfc train --max-restarts 3`: when train.stop_grace_s runs out, torchrun is killed with
    the ranks. Killing only the ranks made torchrun restart the group, whose new ranks trained on without the
    signal, and the launcher exited 0."""
    prefix, _ = dataset
    out = tmp_path / "run"
    grace = 2
    sets = {"train.steps": 400, "checkpoint.every_steps": 1000, "train.stop_grace_s": grace}
    args = [*_train_args(prefix, out, **sets), "--nproc-per-node", "2", "--max-restarts", "3"]
    env = _env()
    env["PFC_FAULT"] = "stop:2:1"  # rank 1 SIGSTOPs itself after step 2 (on the first attempt only)
    log = (tmp_path / "launch.log").open("w+")
    # a session of its own: torchrun shares the launcher's process group, so `finally` can end both at once
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                            env=env, text=True, start_new_session=True)
    restarted: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if any(_state(p) == "T" for p in _processes_mentioning(str(out))):
                break  # rank 1 hangs
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be signalled"
        ranks = [p for p in _processes_mentioning(str(out)) if _attempt(p) == "0"]
        assert len(ranks) == 2, ranks
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # a second signal within the grace only prints a line
        # Wait for the launcher; a rank of a later attempt ends the wait at once (the bug under test).
        while proc.poll() is None and time.monotonic() - t0 < grace + 20 and not restarted:
            restarted |= {p for p in _processes_mentioning(str(out)) if _attempt(p) not in (None, "0")}
            time.sleep(0.1)
        took = time.monotonic() - t0
        code = proc.poll()
        survivors = [p for p in _processes_mentioning(str(out)) if _state(p) not in ("", "Z")]
    finally:
        for pid in _processes_mentioning(str(out)):
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)  # each rank leads a session of its own (DataLoader workers too)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.seek(0)
    text = log.read()
    assert not restarted, f"torchrun restarted the ranks after the grace period: new ranks {sorted(restarted)}"
    assert code == STOP_KILLED_EXIT_CODE, f"launcher exit code {code} after {took:.1f}s\n" + text[-4000:]
    assert grace <= took < grace + 15, f"the launcher needed {took:.1f}s to end (grace {grace} s)"
    assert not survivors, f"processes of the run outlived the launcher: {survivors}"
    assert "SIGTERM ignored: already stopping on SIGTERM" in text, text[-3000:]
    assert f"did not stop within train.stop_grace_s={grace} s: killing torchrun" in text, text[-3000:]
    assert not (out / "summary.json").exists()  # nothing was saved at the step reached
    print(f"stop past its grace of {grace} s: launcher exited {code} after {took:.1f}s, no restart")


def test_stop_handlers_are_given_back_when_the_process_group_cannot_start(tmp_path, monkeypatch):
    """`pfc train` installs its stop handlers before the rendezvous; when that fails (here NCCL asked for on a
    machine without a GPU, a real refusal), the caller's handlers are back in place afterwards."""
    import torch
    from typer.testing import CliRunner

    from launcher.cli import app

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA, where dist.backend=nccl cannot start")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)

    def mine(signum, frame):  # the embedding program's own handler
        return None

    previous = signal.signal(signal.SIGUSR1, mine)
    try:
        res = CliRunner().invoke(app, ["train", "demo_cpu", "--output", str(tmp_path / "run"),
                                       "--set", "dist.backend=nccl", "--set", "train.stop_signals=[SIGUSR1]"])
        assert res.exit_code != 0 and "nccl needs CUDA" in str(res.output) + str(res.exception), res.output
        assert signal.getsignal(signal.SIGUSR1) is mine
    finally:
        signal.signal(signal.SIGUSR1, previous)
