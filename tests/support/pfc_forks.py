"""Single-process `pfc` commands as forks of one process that has already imported the launcher.

A `pfc` command started as a new interpreter spends 2-3 s of a 2-core machine importing torch, scipy and
the launcher before it reads its first setting; a test that checks ten refusals pays that ten times.
:class:`PfcForks` pays it once: a helper process (this file, run as a script) imports the launcher, then
for each command forks a child that runs what the installed ``pfc`` script runs
(``sys.exit(launcher.cli.main())`` with the command's argv). Each command is still a process of its own:
its exit status, everything written to its file descriptors 1 and 2 (warnings and C-level output too),
its interpreter shutdown, its environment (:func:`pfc_env` of the test's at the call) and working folder
(the test's at the call). Only the imported code is shared, so an environment variable that a module reads
at import time is the one the helper started with; commands under torchrun start fresh interpreters for
their ranks anyway and gain nothing here.

Standard library only at import: the helper process imports this file as its main script.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

# What `pfc train` imports before it reads a checkpoint (torch, scipy and the data pipeline through these):
# the bulk of a command's start-up. torch._inductor: torch.use_deterministic_algorithms imports it (1.4 s).
PRELOAD = ("launcher.cli", "launcher.trainer.loop", "launcher.trainer.evaluation", "launcher.monitoring.plots",
           "launcher.monitoring.trackers", "launcher.trainer.finetune", "launcher.trainer.kernels",
           "torch._inductor.config")


def pfc_env() -> dict[str, str]:
    """This process's environment without a rank's variables or a fault to inject (as ``_pfc`` runs `pfc`),
    with one intra-op thread unless set: the tests' tensors are tiny, and on a shared 2-core machine a
    second thread only spins (a 2-step MobileFaceNet run: 13 s with two under load, 0.5 s with one), the
    reason tests/conftest.py runs the tests themselves on one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.pop("PFC_FAULT", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class PfcForks:
    """A helper process holding the imported launcher; :meth:`run` forks one `pfc` command from it.

    Holds the helper (``_proc``), a thread that moves its reply lines into ``_replies`` (so that a reply
    can be waited for with a timeout) and the process id of the last command (``last_pid``)."""

    def __init__(self, start_timeout: float = 120) -> None:
        self._proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, env=pfc_env())
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.last_pid: int | None = None
        threading.Thread(target=self._read, daemon=True).start()
        self._reply(start_timeout)  # {"ready": true}: the launcher is imported

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._replies.put(json.loads(line))
        self._replies.put(None)  # the helper ended

    def _reply(self, timeout: float) -> dict[str, Any]:
        reply = self._replies.get(timeout=timeout)
        if reply is None:
            raise RuntimeError(f"the pfc fork helper ended (exit {self._proc.wait()}); its stderr is the test's")
        return reply

    def run(self, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """`pfc ARGS` in a forked child: its exit code and what it wrote to stdout and stderr."""
        assert self._proc.stdin is not None
        with tempfile.TemporaryDirectory(prefix="pfc-fork-") as d:
            out, err = Path(d, "stdout"), Path(d, "stderr")
            # the test's environment and folder now (monkeypatch may have changed them since the helper started)
            request = {"argv": args, "stdout": str(out), "stderr": str(err), "env": pfc_env(), "cwd": os.getcwd()}
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            pid = self.last_pid = self._reply(30)["pid"]
            try:
                rc = self._reply(timeout)["rc"]
            except queue.Empty:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._reply(30)
                raise subprocess.TimeoutExpired(["pfc", *args], timeout, out.read_text(), err.read_text()) from None
            return subprocess.CompletedProcess(["pfc", *args], rc, out.read_text(), err.read_text())

    def __enter__(self) -> PfcForks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the helper (it exits when its stdin closes)."""
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def _serve() -> dict[str, Any] | None:
    """The helper's loop: import, then fork per request. Returns the request in a forked child, None when
    stdin closes."""
    for name in PRELOAD:
        importlib.import_module(name)
    gc.freeze()  # the children's collections then skip the imported objects and leave their pages shared
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request: dict[str, Any] = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return request
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
    return None


def _become_pfc(request: dict[str, Any]) -> None:
    """In the child: stdin from /dev/null, stdout and stderr into the request's files, then what the `pfc`
    script runs, ended as the interpreter ends a script (non-daemon threads waited for, atexit handlers,
    streams flushed; the exit code of its SystemExit, or 1 after an uncaught exception's traceback) but
    without tearing down the thousands of modules inherited from the helper, which touches (and so copies)
    most of its memory page by page: 1 s a command instead of 0.1 s."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None  # chosen again from TMPDIR, as a new interpreter would
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    from launcher.cli import main

    sys.argv = [str(Path(sys.executable).with_name("pfc")), *request["argv"]]
    try:
        sys.exit(main())
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # the interpreter waits for non-daemon threads first
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_code(code: object) -> int:
    """The exit status the interpreter gives ``SystemExit(code)``: a message is printed and is status 1."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.path[0] = str(Path(sys.executable).parent)  # as the installed `pfc` script has it, not tests/support
    _request = _serve()
    if _request is not None:
        _become_pfc(_request)
