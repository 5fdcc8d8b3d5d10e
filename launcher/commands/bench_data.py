"""`pfc bench data`."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer

from launcher.commands.groups import bench_app


class LoaderKind(str, Enum):
    dali = "dali"
    torch = "torch"


@bench_app.command("data")
def bench_data_cmd(
    prefix: Path = typer.Argument(..., help="Dataset prefix (PREFIX.rec, PREFIX.idx, property), a folder "
                                  "holding train.rec, or PREFIX.rec."),
    loader: LoaderKind = typer.Option(LoaderKind.torch, "--loader", help="Which loader to measure."),
    threads: int = typer.Option(2, "--threads", min=0, help="DataLoader workers (torch) or DALI threads; "
                                "the decode ceiling uses the same number."),
    batch: int = typer.Option(128, "--batch", min=1, help="Batch size."),
    seconds: float = typer.Option(10.0, "--seconds", min=0.1, help="Measured seconds for each of the loader "
                                  "and the decode ceiling."),
    device_id: int | None = typer.Option(None, "--device-id", help="DALI on this GPU (mixed decode); "
                                         "default CPU."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Alternate loader and ceiling this many times "
                               "(fair on a machine shared with other work)."),
    as_float: bool = typer.Option(False, "--float", help="Measure the former float32 [-1, 1] hand-over "
                                  "(normalised on the loader's CPU) instead of the uint8 pixels the trainer "
                                  "takes and normalises on its device."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the result as JSON here."),
) -> None:
    """Loader throughput against the raw JPEG decode ceiling."""
    from data_pipeline.bench import bench_data
    from data_pipeline.dataset import default_prefix

    if loader is LoaderKind.dali:
        from data_pipeline.dali_iterator import dali_available

        if not dali_available():
            typer.echo("pfc bench data: --loader dali needs NVIDIA DALI (pip install "
                       "'partialfc-discface[dali]')", err=True)
            raise typer.Exit(code=2)
    try:
        res = bench_data(default_prefix(prefix), loader.value, threads=threads, batch_size=batch,
                         seconds=seconds, device_id=device_id, rounds=rounds, uint8=not as_float)
    except (ValueError, OSError) as exc:
        typer.echo(f"pfc bench data: {exc}", err=True)
        raise typer.Exit(code=2) from None
    decoder = "DALI decoder" if loader is LoaderKind.dali else "PIL"
    typer.echo(f"{loader.value} loader, {threads} threads, batch {batch}, {res.image_size[0]}x{res.image_size[1]} "
               f"on {res.device}, handed over as {res.handover}:")
    typer.echo(f"  loader         {res.images_per_s:10.1f} images/s ({res.images} images in {res.seconds:.1f} s)")
    typer.echo(f"  decode ceiling {res.decode_ceiling_images_per_s:10.1f} images/s ({decoder}, same threads)")
    rounds_txt = ", ".join(f"{r:.2f}" for r in res.round_ratios)
    typer.echo(f"  ratio          {res.ratio:10.3f} (rounds: {rounds_txt})")
    typer.echo(f"  CPU per image: loader {res.loader_cpu_ms_per_image:.3f} ms, decode "
               f"{res.ceiling_cpu_ms_per_image:.3f} ms, ratio {res.cpu_ratio:.3f}"
               + (f"  (load average {res.load_average:.1f} on {res.cpu_count} CPUs)" if res.load_average else ""))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(res.to_dict(), indent=2) + "\n")
