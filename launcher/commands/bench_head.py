"""`pfc bench head`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from launcher.commands.groups import bench_app


@bench_app.command("head")
def bench_head_cmd(
    classes: int = typer.Option(..., "--classes", min=1, help="Number of classes C."),
    dim: int = typer.Option(512, "--dim", min=1, help="Embedding size D."),
    batch: int = typer.Option(128, "--batch", min=1, help="Local batch B per rank."),
    sample_rate: float = typer.Option(0.1, "--sample-rate", min=0.0, max=1.0, help="Sample rate r in (0, 1]."),
    world_size: int = typer.Option(2, "--world-size", min=1, help="Ranks W to spawn."),
    steps: int = typer.Option(10, "--steps", min=1, help="Timed steps (the median is reported)."),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Untimed steps first."),
    discface_lambda: float = typer.Option(0.0, "--discface-lambda", min=0.0, help="DiscFace weight lambda."),
    threads: int | None = typer.Option(None, "--threads", min=1,
                                       help="Torch threads per rank (default: CPU cores // W)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the head, its sampler and the random inputs."),
    floor: str = typer.Option("interleaved", "--floor",
                              help="interleaved: one GEMM-floor rep after every timed step (both see the same "
                                   "machine load; its buffers stay allocated during the run, outside the head's "
                                   "memory); after: 5 reps once the head is freed (for runs tight on memory)."),
    profile_dir: Path | None = typer.Option(
        None, "--profile", help="Write a torch.profiler table and trace per rank of the timed steps into this "
                                "folder (the profiler inflates the step times it reports; the floor is then "
                                "timed after the steps)."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the result as JSON here."),
) -> None:
    """Partial FC head step time against its GEMM floor, memory and traffic per rank."""
    from launcher.bench.head_results import format_summary
    from launcher.bench.head_step import BenchConfig, run_bench

    cfg = BenchConfig(num_classes=classes, dim=dim, batch=batch, sample_rate=sample_rate,
                      world_size=world_size, steps=steps, warmup=warmup, discface_lambda=discface_lambda,
                      seed=seed, threads=threads, floor=floor, profile_dir=str(profile_dir) if profile_dir else None)
    try:
        cfg.validate()
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    result = run_bench(cfg)
    typer.echo(format_summary(result))
    if profile_dir is not None:
        typer.echo(f"profiles in {profile_dir}/profile_rank*.txt, traces in {profile_dir}/trace_rank*.json")
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        typer.echo(f"wrote {json_path}")
