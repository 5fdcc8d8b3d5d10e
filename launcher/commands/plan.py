"""`pfc plan`."""

from __future__ import annotations

from launcher.commands.groups import app, not_yet


@app.command("plan")
def plan_cmd() -> None:
    """Memory and communication per rank for a run, across world sizes."""
    not_yet("pfc plan", 4)
