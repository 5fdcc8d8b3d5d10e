"""`pfc config show`."""

from __future__ import annotations

import typer

from launcher.commands.groups import config_app
from launcher.commands.output import config_or_exit, print_json
from launcher.config import build_overrides, dump_config


@config_app.command("show")
def show_cmd(
    config: str = typer.Argument(..., help="YAML file or built-in recipe name"),
    data: str | None = typer.Option(None, "--data", help="training data, as pfc train --data takes it "
                                    "(data.prefix; nothing is packed or read)"),
    val_bin: list[str] | None = typer.Option(None, "--val-bin", help="verification .bin (repeatable; data.val_bins)"),
    output: str | None = typer.Option(None, "--output", help="run folder (output)"),
    sets: list[str] | None = typer.Option(None, "--set", help="override: section.field=value"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of YAML"),
) -> None:
    """Print the resolved configuration (defaults < file < --data/--val-bin/--output < --set): what
    `pfc train` with the same arguments would run."""
    # the same flags as pfc train, turned into the same overrides, so a recipe that needs one (finetune_small's
    # checkpoint.keep_best needs a --val-bin) shows as it would train
    cfg = config_or_exit(config, build_overrides(data, val_bin, output, sets))
    if as_json:
        print_json(cfg.model_dump(mode="json"))
    else:
        typer.echo(dump_config(cfg))
