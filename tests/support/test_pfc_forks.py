"""tests/support/pfc_forks.py: a `pfc` command forked from the helper ends as the same command run as a new
interpreter does (exit code, stdout, stderr, a traceback under --debug), and a command past its timeout is
killed without taking the helper with it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.runs import _pfc, _train_args

pytestmark = pytest.mark.multiprocess


def _last_line(text: str) -> str:
    return [x for x in text.splitlines() if x.strip()][-1]


def test_a_forked_command_ends_as_a_new_interpreter_does(dataset, pfc, tmp_path):
    prefix, _ = dataset
    mismatch = _train_args(prefix, tmp_path / "a", **{"model.image_size": 64})
    # what it prints on stdout (through the os._exit that ends the child) and a refusal on stderr
    for args in (["plan", "--classes", "1000", "--world-size", "2", "--batch", "8", "--dim", "16"], mismatch):
        forked, real = pfc.run(args, timeout=120), _pfc(args, timeout=240)
        assert forked.returncode == real.returncode, (args, forked.stderr[-2000:], real.stderr[-2000:])
        assert forked.stdout == real.stdout and forked.stderr == real.stderr, args
    # an uncaught exception: its traceback, exit 1
    r = pfc.run(["--debug", *mismatch], timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("Traceback"), r.stderr[-2000:]
    assert _last_line(r.stderr).startswith("launcher.errors.DataError: model.image_size=64 but"), r.stderr[-2000:]


def test_a_forked_command_takes_the_tests_environment_and_folder_at_the_call(pfc, tmp_path, monkeypatch):
    """monkeypatch changes them after the helper started: the command must see the change, as a new
    interpreter started then would."""
    monkeypatch.setenv("PFC_DEBUG", "1")  # launcher.errors reads it when a command fails: a traceback
    r = pfc.run(["data", "inspect", str(tmp_path / "no_such_prefix")], timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("Traceback"), r.stderr[-2000:]
    monkeypatch.chdir(tmp_path)  # a relative path is the test's folder's
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    r = pfc.run(["report", "run", "--out", "plots"], timeout=60)
    assert r.returncode == 0 and (tmp_path / "plots" / "loss.png").is_file(), r.stderr[-2000:]


def test_a_command_past_its_timeout_is_killed_and_the_helper_goes_on(dataset, pfc, tmp_path):
    prefix, _ = dataset
    with pytest.raises(subprocess.TimeoutExpired):
        pfc.run(_train_args(prefix, tmp_path / "run", **{"train.steps": 100000}), timeout=1)
    assert pfc.last_pid is not None and not _alive(pfc.last_pid), "the timed-out command is still running"
    r = pfc.run(["nope"], timeout=60)
    assert r.returncode == 2 and "No such command" in r.stderr


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
