"""`pfc config show`."""

from __future__ import annotations

from launcher.commands.groups import config_app, not_yet


@config_app.command("show")
def show_cmd() -> None:
    """Print the resolved configuration."""
    not_yet("pfc config show", 6)
