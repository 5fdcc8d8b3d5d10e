"""`pfc bench data`."""

from __future__ import annotations

from launcher.commands.groups import bench_app, not_yet


@bench_app.command("data")
def bench_data_cmd() -> None:
    """Loader throughput against the raw JPEG decode ceiling."""
    not_yet("pfc bench data", 3)
