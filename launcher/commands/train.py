"""`pfc train` and `pfc demo`."""

from __future__ import annotations

from launcher.commands.groups import app, not_yet


@app.command("train")
def train_cmd() -> None:
    """Train from a config, under torchrun or launching it."""
    not_yet("pfc train", 6)


@app.command("demo")
def demo_cmd() -> None:
    """Synthetic data, 2 CPU ranks with Partial FC + DiscFace, then evaluation."""
    not_yet("pfc demo", 6)
