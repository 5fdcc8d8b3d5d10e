"""`pfc data synth`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from launcher.commands.groups import data_app


@data_app.command("synth")
def synth_cmd(
    out_prefix: Path = typer.Argument(..., help="Output prefix: writes PREFIX.rec, PREFIX.idx, the property "
                                      "file (<dir>/property when the name is 'train') and a verification .bin."),
    identities: int = typer.Option(1000, "--identities", min=1, help="Training identities (classes)."),
    images_per_identity: int = typer.Option(10, "--images-per-identity", min=1, help="Images per identity."),
    image_size: int = typer.Option(112, "--image-size", min=8, help="Side of the square images in pixels."),
    val_identities: int = typer.Option(100, "--val-identities", min=0,
                                       help="Identities (not in training) for the verification .bin; 0: none."),
    val_pairs: int = typer.Option(600, "--val-pairs", min=2, help="Verification pairs (half genuine)."),
    val_bin: Path | None = typer.Option(None, "--val-bin", help="Where to write the .bin (default "
                                        "<dir>/synth_val.bin for a prefix named 'train', else PREFIX_val.bin)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same files)."),
    workers: int | None = typer.Option(None, "--workers", min=1, help="Worker processes (default: CPUs)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the summary as JSON here."),
) -> None:
    """Generate a learnable synthetic identity dataset plus a verification .bin."""
    from tqdm import tqdm

    from data_pipeline.synth import generate

    bar = tqdm(total=identities, unit="id", disable=not progress, desc="synth")
    try:
        report = generate(out_prefix, identities, images_per_identity, image_size=image_size,
                          val_identities=val_identities, val_pairs=val_pairs, seed=seed, workers=workers,
                          val_bin=val_bin, progress=lambda n: bar.update(n))
    except (ValueError, OSError) as exc:
        typer.echo(f"pfc data synth: {exc}", err=True)
        raise typer.Exit(code=2) from None
    finally:
        bar.close()
    typer.echo(f"wrote {report.images} images of {report.identities} identities "
               f"({report.image_size}x{report.image_size}) -> {report.prefix}.rec "
               f"({report.rec_bytes / 2**20:.1f} MiB)")
    typer.echo(f"  {report.train_seconds:.1f} s for the training set ({report.images_per_s:.0f} images/s on "
               f"{report.workers} workers), {report.seconds:.1f} s in all, {report.cpu_seconds:.1f} CPU-s")
    if report.val_bin:
        typer.echo(f"  verification: {report.val_pairs} pairs of {report.val_identities} unseen identities "
                   f"-> {report.val_bin}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
