"""`pfc bench head`."""

from __future__ import annotations

from launcher.commands.groups import bench_app, not_yet


@bench_app.command("head")
def bench_head_cmd() -> None:
    """Partial FC head step time against its GEMM floor, memory and traffic per rank."""
    not_yet("pfc bench head", 4)
