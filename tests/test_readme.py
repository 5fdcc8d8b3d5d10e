"""The README's command table lists every `pfc` command (issue 15 item 6)."""

from __future__ import annotations

import re
from pathlib import Path

import launcher.cli  # noqa: F401  registers every command on the app
from launcher.commands.groups import app

README = Path(__file__).resolve().parents[1] / "README.md"


def _commands() -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = [(c.name or "",) for c in app.registered_commands]
    for g in app.registered_groups:
        out += [(str(g.name), c.name or "") for c in g.typer_instance.registered_commands]
    return out


def test_command_table_lists_every_command():
    first_cells = [line.split("|")[1] for line in README.read_text().splitlines() if line.startswith("| `pfc ")]
    missing = []
    for cmd in _commands():
        if len(cmd) == 1:
            ok = any(cell.strip().startswith(f"`pfc {cmd[0]}") for cell in first_cells)
        else:
            group, name = cmd
            ok = any(cell.strip().startswith(f"`pfc {group} ") and re.search(rf"\b{name}\b", cell)
                     for cell in first_cells)
        if not ok:
            missing.append(" ".join(cmd))
    assert len(_commands()) >= 18  # 7 top-level, data x4, bench x4, export x2, config x1
    assert not missing, f"README command table lacks: {missing}"
