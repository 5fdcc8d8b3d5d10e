"""A stop signal saves, then stops (launcher/trainer/preemption.py), with real signals and real ranks.

* SIGTERM to the ``pfc train --nproc-per-node 2`` process: every rank stops after the same step, a
  checkpoint exists at that step, the launcher exits 76 within a bound, no rank outlives it, and the
  resumed run ends bit-identical to an uninterrupted one.
* A configured signal (``train.stop_signals``) reaching one rank only: the all-reduce makes both stop.
* ``train.stop_grace_s``: a rank that does not stop is killed after the grace period.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from launcher.trainer.preemption import STOPPED_EXIT_CODE, SignalForwarder, child_pids, torchrun_stop_setup
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


def test_stop_grace_kills_ranks_that_do_not_stop_and_torchrun_ignores_the_signal():
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
            code = fwd.wait()
            took = time.monotonic() - t0
        assert fwd.forwarded == signal.SIGTERM
        # the "torchrun" ignored SIGTERM (preexec), outlived its rank and saw it SIGKILLed
        assert code == 0 and proc.stdout.readline().strip() == str(-signal.SIGKILL)
        assert 1.5 <= took < 10, took
        assert rank not in child_pids(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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
