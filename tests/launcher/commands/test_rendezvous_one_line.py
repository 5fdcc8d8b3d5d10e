"""A multi-node launch whose other node never joins (README: one line, exit 3): the real `pfc train
--nnodes 2` starting a real torchrun whose c10d rendezvous times out. torchrun's own 40-line
RendezvousTimeoutError traceback is not shown, but under ``--debug``; a rank's traceback (a bug) still
passes through (launcher.distributed._StderrRelay)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.support.runs import _train_args, dataset  # noqa: F401

pytestmark = pytest.mark.multiprocess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pfc(args: list[str], **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    for name in ("PFC_FAULT", "PFC_DEBUG"):
        env.pop(name, None)
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True,
                          timeout=180, env=env)


def _lonely_node(prefix, out, endpoint: str) -> list[str]:
    return [*_train_args(prefix, out), "--nproc-per-node", "1", "--nnodes", "2", "--node-rank", "0",
            "--rdzv-endpoint", endpoint, "--rdzv-timeout", "4"]


def test_rendezvous_timeout_is_one_line_and_its_traceback_only_under_debug(dataset, tmp_path):  # noqa: F811
    prefix, _ = dataset
    endpoint = f"127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    r = _pfc(_lonely_node(prefix, tmp_path / "run", endpoint))
    assert time.monotonic() - t0 >= 4, "the timeout was not honoured"
    assert r.returncode == 3, (r.stdout + r.stderr)[-3000:]
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-4000:]
    assert lines[0].startswith(f"pfc: rendezvous at {endpoint} timed out after 4 s: not all 2 nodes joined")
    r = _pfc(["--debug", *_lonely_node(prefix, tmp_path / "run", f"127.0.0.1:{_free_port()}")])
    assert r.returncode == 3, (r.stdout + r.stderr)[-3000:]
    assert "torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError" in r.stderr, r.stderr[-4000:]
    assert r.stderr.strip().splitlines()[-1].startswith("pfc: rendezvous at ")


def test_a_ranks_traceback_still_reaches_the_user(dataset, tmp_path):  # noqa: F811
    prefix, _ = dataset
    # a malformed PFC_FAULT is a bug-class error (ValueError) raised in the rank, not in the launcher
    r = _pfc([*_train_args(prefix, tmp_path / "run"), "--nproc-per-node", "1"], PFC_FAULT="bogus")
    assert r.returncode != 0
    assert "Traceback (most recent call last):" in r.stderr and "PFC_FAULT='bogus'" in r.stderr, r.stderr[-4000:]
    assert 'launcher/cli.py", line' in r.stderr, r.stderr[-4000:]
