"""Stop on a signal without losing work: save a checkpoint at the step every rank agrees on, then exit.

Clusters end jobs with a signal: SLURM preemption and time limits (SIGTERM, or an early warning such as
``#SBATCH --signal=B:USR1@300``), Kubernetes pod deletion and ``docker stop`` (SIGTERM to PID 1),
Ctrl-C (SIGINT). What happens, end to end:

1. ``pfc train --nproc-per-node N`` (the launcher) starts torchrun with the stop signals ignored and
   left out of torchrun's ``--signals-to-handle``: torchrun's own handling would kill each rank's
   process group (DataLoader workers too) and SIGKILL the ranks 30 s later. Instead the launcher's
   :class:`SignalForwarder` sends the signal to every rank itself (repeating it each second until they
   exit). A signal delivered to every process of the job (SLURM signals a whole job step) reaches the
   ranks directly; torchrun ignores it. Ranks still running after ``train.stop_grace_s`` are SIGKILLed
   together with torchrun (so that ``--max-restarts`` cannot start a new attempt), and the launcher
   exits :data:`STOP_KILLED_EXIT_CODE`.
2. Each rank's :class:`StopRequest` handler only records the signal (nothing unsafe runs inside a
   signal handler). At each step boundary the ranks all-reduce the flag (MAX of the signal numbers,
   one 1-element collective), so they all stop after the same step even though the signal reaches
   them at different moments, or reaches only some of them (one node of several).
3. The ranks save a checkpoint at that step (unless the step's periodic save just wrote it, or steps
   are being skipped as non-finite: then the last checkpoint stays the newest), rank 0 writes
   ``summary.json`` with ``"stopped": {"signal", "step", "checkpoint"}``, and the ranks exit: with 0
   under the launcher's torchrun (a failing rank would make torchrun restart the group), with
   :data:`STOPPED_EXIT_CODE` otherwise. The launcher exits with :data:`STOPPED_EXIT_CODE` when this
   launch's ``summary.json`` says the run stopped.

DataLoader worker processes ignore the stop signals (``data_pipeline.dataset``): the rank ends them.

Resuming from that checkpoint reaches bit-identical weights to an uninterrupted run (the resume is
exact: see ``launcher/trainer/loop.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from partialfc.collectives import max_over_ranks

log = logging.getLogger("pfc")

# Documented exit code of a run that stopped on a signal after saving (docs/deploy.md). Not 0 (the run
# is not finished: a scheduler must not treat it as done), not 128+N (that reads as "killed by signal N
# without cleaning up"), and not the hang watchdog's 75.
STOPPED_EXIT_CODE = 76
# Exit code of a launch whose ranks had not stopped when train.stop_grace_s ran out after a stop signal:
# the launcher SIGKILLed torchrun and every rank, so no checkpoint was saved at the step reached (the
# newest is the last periodic one). Distinct from 76 (a scheduler must not take it as "saved": the SLURM
# script requeues only on 76), from 0 (not finished), from 137 (the launcher itself SIGKILLed, e.g. by the
# OOM killer or by a cluster whose own grace ran out first) and from the hang watchdog's 75. `pfc train`
# still exits 76 if this launch's summary.json says the run stopped (the save was complete and only the
# ranks' exit hung).
STOP_KILLED_EXIT_CODE = 77

# What torchrun handles by default; the stop signals are taken out of this list.
TORCHRUN_DEFAULT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
# Set by the launcher for its ranks: they exit 0 after a stop (torchrun would restart a group whose
# ranks fail, --max-restarts); the launcher reads summary.json and exits STOPPED_EXIT_CODE itself.
LAUNCHER_ENV = "PFC_STOP_BY_LAUNCHER"


def rank_stopped_exit_code() -> int:
    """Exit code of a rank that stopped on a signal: 0 under the pfc launcher's torchrun, else 76."""
    return 0 if os.environ.get(LAUNCHER_ENV) == "1" else STOPPED_EXIT_CODE


def parse_signal(name: str) -> signal.Signals:
    """``"SIGUSR1"``, ``"USR1"`` or ``"10"`` -> ``signal.SIGUSR1``; ValueError naming the value otherwise."""
    text = str(name).strip().upper()
    try:
        if text.isdigit():
            return signal.Signals(int(text))
        return signal.Signals[text if text.startswith("SIG") else "SIG" + text]
    except (KeyError, ValueError):
        raise ValueError(f"{name!r} is not a signal name (expected e.g. SIGTERM, SIGINT, SIGUSR1)") from None


class StopRequest:
    """One rank's record of a stop signal, and the step-boundary agreement on it.

    :meth:`install` sets the handlers (main thread only; elsewhere it logs and does nothing, so a
    rank started in a thread by a test still trains). The handler stores the signal number; the
    training loop calls :meth:`agreed` once per step.
    """

    def __init__(self, signals: Iterable[str]) -> None:
        self.signals = [parse_signal(s) for s in signals]
        self.received: int = 0  # signal number, 0: none
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            log.warning("stop signals are not handled: training does not run in the main thread")
            return self
        for s in self.signals:
            if s not in self._previous:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only record: the loop acts at the next step boundary. The first signal wins.
        if not self.received:
            self.received = signum

    def agreed(self, ctx: Any) -> int:
        """The stop signal (number) if any rank received one, else 0; the same on every rank.

        Collective: every rank of ``ctx`` must call it at the same step. One all-reduce (MAX) of one
        int32 on ``ctx.device`` (NCCL needs a device tensor).
        """
        if not getattr(ctx, "distributed", False):
            return self.received
        return max_over_ranks(self.received, device=ctx.device)


@dataclass
class TorchrunStopSetup:
    """How the launcher starts torchrun so that stop signals reach the ranks and not torchrun."""

    torchrun_args: list[str]
    env: dict[str, str]
    signals: list[signal.Signals]

    def preexec(self) -> None:
        """In the torchrun child before exec: ignore the stop signals (SIG_IGN survives exec; the ranks
        install their own handlers). A signal sent to every process of a job (SLURM signals the whole
        step) then cannot end torchrun or make it kill the ranks' process groups."""
        for s in self.signals:
            signal.signal(s, signal.SIG_IGN)


def torchrun_stop_setup(stop_signals: Iterable[str]) -> TorchrunStopSetup:
    sigs = [parse_signal(s) for s in stop_signals]
    names = {s.name for s in sigs}
    # torchrun would otherwise install its own handler for SIGTERM/SIGINT, which kills the ranks' groups
    # (DataLoader workers included) and SIGKILLs them 30 s later.
    handled = [n for n in TORCHRUN_DEFAULT_SIGNALS if n not in names]
    args = [f"--signals-to-handle={','.join(handled)}"] if sigs else []
    env = {LAUNCHER_ENV: "1"} if sigs else {}
    return TorchrunStopSetup(args, env, sigs)


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (torchrun's ranks), from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def _wait_stopped(pid: int, timeout_s: float, states: tuple[str, ...] = ("T", "t", "Z", "X")) -> None:
    """Wait (at most ``timeout_s``) until ``pid`` is in one of ``states`` (default: stopped, a zombie) or
    gone: after kill() returns, the process may still be running until the kernel next schedules it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in states:
            return
        time.sleep(0.01)


def _kill_with_group(pid: int) -> None:
    """SIGKILL ``pid`` and, when it leads its own process group, the whole group: torchrun starts each rank
    in a new session, so the group holds the rank's DataLoader workers (which would keep torchrun's
    stderr pipe, and so the launcher, open)."""
    with contextlib.suppress(OSError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


class SignalForwarder:
    """In the launcher: on a stop signal, signal every rank (torchrun's children) and wait for them.

    The ranks get the signal again every second until they exit (a rank still starting up ignores it
    until its handler is installed; a rank torchrun restarts meanwhile gets it too). When ``grace_s`` runs
    out, torchrun and every rank are SIGKILLed (:meth:`kill_launch`) and :meth:`wait` returns
    :data:`STOP_KILLED_EXIT_CODE`. Repeated signals to the launcher only print a line during the grace
    period; after it they kill again. torchrun itself ignores stop signals (:func:`torchrun_stop_setup`).
    """

    def __init__(self, proc: subprocess.Popen[Any], signals: Iterable[str], grace_s: float | None = None) -> None:
        self.proc = proc
        self.signals = [parse_signal(s) for s in signals]
        self.grace_s = grace_s
        self.forwarded: int = 0
        self.killed = False  # the grace period ran out: torchrun and the ranks were SIGKILLed
        self._previous: dict[signal.Signals, Any] = {}
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

    def __enter__(self) -> SignalForwarder:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()

    def wait(self) -> int:
        """torchrun's exit code, or :data:`STOP_KILLED_EXIT_CODE` when the grace period ran out (torchrun
        then died of our SIGKILL: -9, which as an exit status would read as 247)."""
        code = self.proc.wait()
        return STOP_KILLED_EXIT_CODE if self.killed else code

    def kill_launch(self) -> None:
        """SIGKILL torchrun and every rank (each with its process group). Safe to repeat.

        Killing the ranks alone is not enough: torchrun's agent sees a failed worker group and, with
        ``--max-restarts`` > 0, starts a new one whose ranks resume training and never get the signal.
        So torchrun is frozen first (SIGSTOP cannot be ignored): it can then neither start a rank between
        our listing its children and killing it, nor react to their deaths. torchrun is killed by pid, not
        by process group: it shares the launcher's group (kept so that a terminal's SIGQUIT or hang-up
        still reaches it), and its agent, rendezvous store and restart logic are all threads of it.
        """
        if self.proc.poll() is not None:
            return
        self.killed = True
        with contextlib.suppress(OSError):
            os.kill(self.proc.pid, signal.SIGSTOP)
        _wait_stopped(self.proc.pid, 1.0)
        ranks = child_pids(self.proc.pid)  # listed before torchrun dies: its children are then reparented
        for pid in ranks:
            _kill_with_group(pid)
        # torchrun last, once its ranks are dead (zombies it cannot reap while frozen): when wait() returns,
        # no rank is left running
        for pid in ranks:
            _wait_stopped(pid, 1.0, states=("Z", "X"))
        with contextlib.suppress(OSError):
            os.kill(self.proc.pid, signal.SIGKILL)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.killed:
            # Not swallowed: the stop is past its grace; kill again in case a process survived the first try.
            sys.stderr.write(f"pfc: {name}: train.stop_grace_s ran out: killing torchrun and the ranks\n")
            sys.stderr.flush()
            self.kill_launch()
            return
        if self.forwarded:
            sys.stderr.write(f"pfc: {name} ignored: already stopping on {signal.Signals(self.forwarded).name} "
                             "(the ranks are saving a checkpoint; SIGKILL ends at once)\n")
            return
        self.forwarded = signum
        sys.stderr.write(f"pfc: {name}: every rank saves a checkpoint at the next step boundary, then stops\n")
        sys.stderr.flush()
        self._send(signum)
        self._thread = threading.Thread(target=self._keep_sending, name="pfc-stop-forwarder", daemon=True)
        self._thread.start()

    def _send(self, signum: int) -> None:
        for pid in child_pids(self.proc.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signum)

    def _keep_sending(self) -> None:
        deadline = None if self.grace_s is None else time.monotonic() + self.grace_s
        # every second, and once exactly at the deadline
        while not self._done.wait(1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))):
            if self.proc.poll() is not None:
                return
            if deadline is not None and time.monotonic() >= deadline:
                sys.stderr.write(f"pfc: the ranks did not stop within train.stop_grace_s={self.grace_s:g} s: "
                                 "killing torchrun and every rank (no restart); no checkpoint at the step "
                                 f"reached; exit code {STOP_KILLED_EXIT_CODE}\n")
                sys.stderr.flush()
                self.kill_launch()
                return
            self._send(self.forwarded)
