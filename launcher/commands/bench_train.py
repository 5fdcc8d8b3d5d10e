"""`pfc bench train`."""

from __future__ import annotations

from launcher.commands.groups import bench_app, not_yet


@bench_app.command("train")
def bench_train_cmd() -> None:
    """Training throughput and step-time split for a config."""
    not_yet("pfc bench train", 6)
