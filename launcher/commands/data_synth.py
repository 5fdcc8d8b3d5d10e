"""`pfc data synth`."""

from __future__ import annotations

from launcher.commands.groups import data_app, not_yet


@data_app.command("synth")
def synth_cmd() -> None:
    """Generate a learnable synthetic identity dataset plus a verification .bin."""
    not_yet("pfc data synth", 3)
