"""Run Python snippets under real MXNet in ``.venv-mxnet`` (built by ``make oracle``).

MXNet 1.9.1 needs numpy<1.24, so it can never share the project's environment: tests hand it a
snippet and exchange data through files and JSON on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
ORACLE_PYTHON = Path(os.environ.get("PFC_MXNET_PYTHON", REPO / ".venv-mxnet" / "bin" / "python"))


def oracle_available() -> tuple[bool, str]:
    if not ORACLE_PYTHON.exists():
        return False, (f"MXNet oracle environment not found at {ORACLE_PYTHON}: "
                       "run `make oracle` (needs PyPI access for mxnet==1.9.1 and numpy<1.24)")
    probe = subprocess.run([str(ORACLE_PYTHON), "-c", "import mxnet"], capture_output=True, text=True)
    if probe.returncode != 0:
        return False, f"`import mxnet` fails in {ORACLE_PYTHON}: {probe.stderr.strip()[-300:]}"
    return True, ""


def require_oracle() -> None:
    ok, why = oracle_available()
    if not ok:
        pytest.skip(why)


def run_oracle(snippet: str, timeout: float = 120.0) -> Any:
    """Run ``snippet`` under MXNet; it must print one JSON document last on stdout, returned here."""
    require_oracle()
    proc = subprocess.run([str(ORACLE_PYTHON), "-c", snippet], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"MXNet oracle snippet failed (exit {proc.returncode}):\n{proc.stderr}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if not lines:
        raise AssertionError("MXNet oracle snippet printed nothing")
    return json.loads(lines[-1])


__all__ = ["ORACLE_PYTHON", "oracle_available", "require_oracle", "run_oracle"]
