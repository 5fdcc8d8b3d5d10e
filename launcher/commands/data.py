"""`pfc data pack|inspect|pairs`."""

from __future__ import annotations

from launcher.commands.groups import data_app, not_yet


@data_app.command("pack")
def pack_cmd() -> None:
    """Pack an image folder or .lst into MS1M-layout RecordIO."""
    not_yet("pfc data pack", 3)


@data_app.command("inspect")
def inspect_cmd() -> None:
    """Check every record of a dataset and print statistics."""
    not_yet("pfc data inspect", 3)


@data_app.command("pairs")
def pairs_cmd() -> None:
    """Build a verification .bin of genuine/impostor pairs."""
    not_yet("pfc data pairs", 3)
