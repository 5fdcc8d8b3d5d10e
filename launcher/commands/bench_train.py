"""`pfc bench train`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from launcher.commands.groups import bench_app


@bench_app.command("train")
def bench_train_cmd(
    config: str = typer.Option("demo_cpu", "--config", help="config file or recipe name"),
    data: str | None = typer.Option(None, "--data", help="dataset PREFIX (default: synthetic identities)"),
    steps: int = typer.Option(30, "--steps", min=2, help="timed steps"),
    warmup: int = typer.Option(5, "--warmup", min=0, help="untimed steps first"),
    nproc: int = typer.Option(2, "--nproc", min=1, help="ranks (torchrun --nproc-per-node)"),
    sets: list[str] | None = typer.Option(None, "--set", help="config override section.field=value"),
    json_path: Path | None = typer.Option(None, "--json", help="write the result here"),
) -> None:
    """Training throughput and step-time split (data wait, forward, backward, communication, optimizer)."""
    from launcher.bench_train import bench_train

    res = bench_train(config, data, steps, warmup, nproc, list(sets or []))
    typer.echo(f"{res['backbone']} {res['image_size']}px, {res['world_size']} rank(s) x {res['batch_per_rank']}: "
               f"{res['images_per_s']:.1f} images/s, step {res['step_s'] * 1e3:.1f} ms")
    for k, v in res["split_s"].items():
        typer.echo(f"  {k[5:-2]:<10s} {v * 1e3:8.1f} ms  ({res['split_fraction'][k]:.0%})")
    if json_path is not None:
        json_path.write_text(json.dumps(res, indent=2))
