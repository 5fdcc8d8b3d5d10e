"""`make gpu-check`'s runner: steps as subprocesses, each with its own time budget, logged and recorded.

:class:`Runner` holds the plumbing of ``scripts/gpu_check.py`` (which holds the steps): the total and
per-step budgets, running a command with its output into ``gpu_check.log`` (:meth:`Runner.sh`,
:meth:`Runner.pfc`), recording a step's figures or its error into ``gpu_check.json`` without
stopping the others (:meth:`Runner.step`), and the summary table printed last.

Standard library only: this process never touches the GPU (or imports torch) itself.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

TOTAL_BUDGET_S = 450.0  # the limit is 8 minutes; keep a margin for start-up and the copy back
DRY_BUDGET_FACTOR = 4.0  # --dry-run: every step's budget (and the default total) times this


class StepError(RuntimeError):
    """A step's command failed; the message says which and how."""


class StepTimeout(StepError):
    """A step's command ran out of the step's budget and was ended (what it printed is in the log)."""


def _descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid``, from /proc's parent links (Linux; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _signal_all(pids: set[int], pgid: int, sig: int) -> None:
    for target, kill in [(pgid, os.killpg), *((p, os.kill) for p in pids)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(target, sig)


def _kill_tree(proc: subprocess.Popen[str], grace_s: float = 10.0) -> None:
    """End ``proc`` and everything it started: SIGTERM first (torchrun passes it on to its ranks and
    waits for them), SIGKILL whatever is left after ``grace_s``. The tree is found through /proc's parent
    links as well as ``proc``'s process group, because torchrun starts each rank in a session of its own
    (and a rank whose parent died is no longer a child of anything here)."""
    tree = _descendants(proc.pid)
    _signal_all(tree, proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    tree |= _descendants(proc.pid)
    _signal_all(tree, proc.pid, signal.SIGKILL)
    proc.wait()


def _end_late(proc: subprocess.Popen[str], interrupt_s: float) -> str:
    """End a command that ran out of time; returns what it printed. With ``interrupt_s`` > 0 it is first
    sent SIGINT and given that long to exit by itself (pytest then stops at the test it is in and still
    writes its report of the tests it finished); then its whole tree is ended (:func:`_kill_tree`)."""
    out = None
    if interrupt_s > 0:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            out, _ = proc.communicate(timeout=interrupt_s)
    _kill_tree(proc)
    if out is None:
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # something that left the tree still holds the pipe
            out = "[its output is lost: a process outside its tree holds the pipe]"
    return out or ""


class Runner:
    """Budgets, logging and the JSON record of a gpu-check run; the steps are a subclass's methods."""

    def __init__(self, out: Path, dry: bool, total_budget_s: float) -> None:
        self.out = out
        self.dry = dry
        self.device = "cpu" if dry else "cuda"  # what the planner plans for (the head's scratch differs)
        self.work = Path(tempfile.mkdtemp(prefix="pfc-gpu-check-"))
        atexit.register(shutil.rmtree, self.work, ignore_errors=True)  # its files' figures are in the JSON
        self.t0 = time.monotonic()
        self.total = total_budget_s
        self.log_path = out / "gpu_check.log"
        self.log = self.log_path.open("w")
        self.result: dict[str, Any] = {"dry_run": dry, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                       "steps": {}}
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        if dry:
            self.env["PFC_GPU_TESTS_ON_CPU"] = "1"
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU path, even on a GPU machine
        self.step_deadline = 0.0

    def remaining(self) -> float:
        return self.total - (time.monotonic() - self.t0)

    def write(self, text: str) -> None:
        self.log.write(text)
        self.log.flush()

    def sh(self, args: list[str], timeout: float | None = None, env: dict[str, str] | None = None,
           check: bool = True, interrupt_s: float = 0.0) -> str:
        """Run a command, its output into the log; returns the output. Bounded by the step's deadline:
        past it, :class:`StepTimeout`. ``interrupt_s``: that many seconds before the deadline the command
        is sent SIGINT, to stop by itself (see :func:`_end_late`); its tree is ended at the deadline."""
        left = self.step_deadline - time.monotonic()
        limit = min(left, timeout) if timeout is not None else left
        if limit < 3:
            raise StepError(f"no time left in this step's budget for: {shlex.join(args[:6])} ...")
        grace = min(interrupt_s, limit / 4)
        self.write(f"\n$ {shlex.join(args)}   # timeout {limit:.0f} s\n")
        t0 = time.monotonic()
        # Its own session (process group), so that a timeout ends the whole tree: torchrun's ranks, the
        # benchmark's spawned ranks and DataLoader workers would otherwise live on, holding the GPU's
        # memory, and every later step would run out of it.
        proc = subprocess.Popen(args, cwd=REPO, env=env or self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=limit - grace)
        except subprocess.TimeoutExpired:
            out = _end_late(proc, grace)
            how = f"interrupted {grace:.0f} s before, then its process tree ended" if grace else \
                "its process tree ended"
            self.write(out + f"\n[timed out after {limit:.0f} s; {how}]\n")
            raise StepTimeout(f"timed out after {limit:.0f} s: {shlex.join(args[:8])}") from None
        self.write(out + f"[exit {proc.returncode} after {time.monotonic() - t0:.1f} s]\n")
        if check and proc.returncode != 0:
            tail = " | ".join(out.strip().splitlines()[-3:])[-600:]
            raise StepError(f"exit {proc.returncode}: {shlex.join(args[:8])} ...: {tail}")
        return out

    def pfc(self, *args: str, timeout: float | None = None) -> str:
        return self.sh([sys.executable, "-m", "launcher", *args], timeout=timeout)

    def step(self, name: str, budget_s: float, fn: Callable[[], dict[str, Any]]) -> None:
        if self.dry:  # the dry run's CPU may be shared and slow: its budgets only guard against hangs
            budget_s *= DRY_BUDGET_FACTOR
        budget = min(budget_s, self.remaining())
        rec: dict[str, Any] = {"budget_s": round(budget, 1)}
        self.write(f"\n===== {name} (budget {budget:.0f} s, {self.remaining():.0f} s left in all) =====\n")
        if budget < 5:
            rec.update(status="skipped", error="the script's total time budget is spent")
        else:
            self.step_deadline = time.monotonic() + budget
            t0 = time.monotonic()
            try:
                rec.update(fn())
                rec["status"] = rec.get("status", "ok")
            except Exception as e:  # one step's failure must not stop the others
                rec.update(status="failed", error=f"{type(e).__name__}: {e}")
                self.write(traceback.format_exc())
            rec["seconds"] = round(time.monotonic() - t0, 1)
        self.result["steps"][name] = rec
        self.save()
        print(f"[gpu-check] {name}: {rec['status']} ({rec.get('seconds', 0)} s)"
              + (f" - {rec['error'][:200]}" if "error" in rec else ""), flush=True)

    def save(self) -> None:
        self.result["seconds"] = round(time.monotonic() - self.t0, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.result, indent=2, default=str) + "\n")

    def summary_rows(self) -> list[tuple[str, str, str, str]]:
        """(step, status, seconds, detail) rows of the summary table; the subclass knows the steps."""
        raise NotImplementedError

    def print_summary(self) -> None:
        rows = self.summary_rows()
        w0 = max(len(r[0]) for r in rows)
        lines = [f"gpu-check {'(dry run, CPU) ' if self.dry else ''}in {self.result['seconds']} s -> {self.out}",
                 f"{'step':<{w0}}  {'status':<7} {'s':>4}  detail"]
        lines += [f"{a:<{w0}}  {b:<7} {c:>4}  {d}" for a, b, c, d in rows]
        text = "\n".join(lines)
        self.write("\n" + text + "\n")
        print(text, flush=True)
