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
    prefix: Path | None = typer.Argument(None, help="Dataset prefix (PREFIX.rec, PREFIX.idx, property), a "
                                         "folder holding train.rec, or PREFIX.rec (not with --scale)."),
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
    scale: int | None = typer.Option(None, "--scale", min=1, help="Instead: build a synthetic N-image file "
                                     "(tiny payloads) and measure inspect, opening per rank, a forked "
                                     "worker's memory and the DALI epoch boundary (issue 17)."),
    identities: int | None = typer.Option(None, "--identities", min=1, help="With --scale: identities "
                                          "(default N/21, WebFace42M's ratio)."),
    world_size: int = typer.Option(2, "--world-size", min=1, help="With --scale: ranks opening the file at once."),
    workdir: Path | None = typer.Option(None, "--workdir", help="With --scale: where the file goes (default a "
                                        "temporary folder); it is deleted afterwards unless --keep."),
    keep: bool = typer.Option(False, "--keep", help="With --scale: keep the file."),
) -> None:
    """Loader throughput against the raw JPEG decode ceiling (or, with --scale N, the data room's
    figures at N images)."""
    from data_pipeline.dataset import default_prefix
    from data_pipeline.loader_bench import bench_data

    if scale is not None:
        _scale(scale, identities, world_size, workdir, keep, loader is LoaderKind.dali, json_path)
        return
    if prefix is None:
        typer.echo("pfc bench data: give a dataset PREFIX (or --scale N)", err=True)
        raise typer.Exit(code=2)

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


def _scale(images: int, identities: int | None, world_size: int, workdir: Path | None, keep: bool, dali: bool,
           json_path: Path | None) -> None:
    from data_pipeline.dali_iterator import dali_available
    from data_pipeline.scale_bench import bench_scale

    if identities is not None and identities > images:
        typer.echo(f"pfc bench data: --identities {identities} is more than --scale {images} images", err=True)
        raise typer.Exit(code=2)
    res = bench_scale(images, identities, workdir, world_size, keep, dali=dali_available())
    b, ic, ih = res["build"], res["inspect_cold"], res["inspect_cached"]
    typer.echo(f"{images} images, {res['identities']} identities on {res['cpu_count']} CPUs ({res['cpu']}), "
               f"load average {res['load_average_start']}")
    typer.echo(f"  build           {b['seconds']:8.1f} s  ({b['rec_bytes'] / 2**30:.2f} GiB .rec)")
    for name, r in (("inspect (cold)", ic), ("inspect (cache)", ih)):
        typer.echo(f"  {name:15s} {r['seconds']:8.1f} s  peak {r['peak_rss_mib']:7.0f} MiB  "
                   f"{'OK' if r['ok'] else 'FAILED'}: {r['images']} images, {r['identities']} identities")
    for rank, r in enumerate(res["open"]):
        typer.echo(f"  open rank {rank}     {r['open_seconds']:8.1f} s  +{r['rss_added_mib']:.0f} MiB RSS "
                   f"(anon {r['anon_added_mib']:.0f}, file {r['file_added_mib']:.0f}); worker dirtied "
                   f"{r['worker_private_dirty_mib']:.1f} MiB over {r['worker_reads']} reads")
    if "dali" in res:
        d = res["dali"]
        typer.echo(f"  DALI            boundary {d['epoch_boundary_seconds']:.2f} s per rank; per segment of "
                   f"{d['segment_samples']}: index {d['segment_index_seconds']:.2f} s, build "
                   f"{d['segment_build_seconds']:.2f} s ({d['segments']} segments per epoch)")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(res, indent=2) + "\n")
