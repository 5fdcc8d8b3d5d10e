"""``pfc --debug`` / ``PFC_DEBUG=1`` (README: "shows it [the traceback] for user errors too") on every
path a user error takes to its one line: a bad ``--set`` (config_or_exit), a missing ``--data`` and a
missing model (user_errors), a missing dataset a command checks itself (fail with no exception). The real
`pfc` in a subprocess; without debug the same errors stay one line with no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _pfc(args: list[str], debug_env: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.pop("PFC_DEBUG", None)
    if debug_env:
        env["PFC_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def _cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (command line, start of its one line)."""
    return {
        "config_set": (["config", "show", "demo_cpu", "--set", "train.batch_size=on"],
                       "pfc: invalid configuration"),
        "train_data": (["train", "demo_cpu", "--data", str(tmp / "nonexist"), "--output", str(tmp / "run")],
                       f"pfc: data.prefix {tmp / 'nonexist'}: no such dataset"),
        "eval_model": (["eval", str(tmp / "nonexistent"), "--bin", str(tmp / "x.bin")],
                       f"pfc eval: {tmp / 'nonexistent'}: no such file"),
        "inspect_fail": (["data", "inspect", str(tmp / "nothing")], f"pfc data inspect: {tmp / 'nothing'}.rec"),
    }


@pytest.mark.parametrize("case", ["config_set", "train_data", "eval_model", "inspect_fail"])
def test_debug_shows_the_traceback_of_every_user_error_and_keeps_its_line_and_code(tmp_path, case):
    args, line = _cases(tmp_path)[case]
    plain = _pfc(args)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr, plain.stderr[-3000:]
    assert plain.stderr.strip().splitlines() == [plain.stderr.strip()] and plain.stderr.startswith(line)
    # --debug anywhere on the command line, or PFC_DEBUG=1: the traceback, then the same line, same exit code
    for r in (_pfc(["--debug", *args]), _pfc([*args, "--debug"]), _pfc(args, debug_env=True)):
        assert r.returncode == 2, r.stderr[-3000:]
        assert r.stderr.startswith("Traceback (most recent call last):"), r.stderr[-3000:]
        assert r.stderr.strip().splitlines()[-1] == plain.stderr.strip()


def test_fail_without_an_exception_shows_where_the_command_gave_up(tmp_path):
    r = _pfc(["--debug", "data", "inspect", str(tmp_path / "nothing")])
    assert 'launcher/commands/data.py", line' in r.stderr and "in _dataset_prefix" in r.stderr, r.stderr
    assert "in _traceback_text" not in r.stderr  # the frames end at the caller of fail()


def test_help_lists_debug():
    r = _pfc(["--help"])
    assert r.returncode == 0
    assert "--debug" in r.stdout and "PFC_DEBUG=1" in " ".join(r.stdout.split()), r.stdout
