"""`pfc config show`."""

from __future__ import annotations

import typer

from launcher.commands.groups import config_app
from launcher.commands.output import config_or_exit, print_json
from launcher.config import dump_config


@config_app.command("show")
def show_cmd(
    config: str = typer.Argument(..., help="YAML file or built-in recipe name"),
    sets: list[str] | None = typer.Option(None, "--set", help="override: section.field=value"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of YAML"),
) -> None:
    """Print the resolved configuration (defaults < file < --set)."""
    cfg = config_or_exit(config, list(sets or []))
    if as_json:
        print_json(cfg.model_dump(mode="json"))
    else:
        typer.echo(dump_config(cfg))
