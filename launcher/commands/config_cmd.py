"""`pfc config show`."""

from __future__ import annotations

import json

import typer

from launcher.commands.groups import config_app
from launcher.config import ConfigError, dump_config, load_config, resolve_config_path


@config_app.command("show")
def show_cmd(
    config: str = typer.Argument(..., help="YAML file or built-in recipe name"),
    sets: list[str] | None = typer.Option(None, "--set", help="override: section.field=value"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of YAML"),
) -> None:
    """Print the resolved configuration (defaults < file < --set)."""
    try:
        cfg = load_config(resolve_config_path(config), list(sets or []))
    except ConfigError as e:
        typer.echo(f"pfc: {e}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2) if as_json else dump_config(cfg))
