"""`pfc eval`."""

from __future__ import annotations

from launcher.commands.groups import app, not_yet


@app.command("eval")
def eval_cmd() -> None:
    """Verification accuracy and TAR@FAR of a model on .bin sets."""
    not_yet("pfc eval", 6)
