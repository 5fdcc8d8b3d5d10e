"""`pfc data pack|inspect|pairs|synth`: make, check and pair MXNet RecordIO face datasets."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from launcher.commands.groups import data_app
from launcher.commands.output import fail, user_errors, write_json

#: `pfc data pack`'s image side without --image-size: insightface's aligned faces (112x112)
DEFAULT_PACK_SIZE = 112


@data_app.command("pack")
def pack_cmd(
    src: Path = typer.Argument(..., help="Image folder (one subfolder per identity) or an im2rec .lst file."),
    out_prefix: Path = typer.Argument(..., help="Output prefix: writes PREFIX.rec, PREFIX.idx and the "
                                      "property file (<dir>/property when the name is 'train')."),
    resize: bool = typer.Option(True, "--resize/--no-resize", help="Resize every image to --image-size."),
    image_size: int | None = typer.Option(None, "--image-size", min=8, help="Side in pixels of the square images "
                                          "written (default 112); a run trains on it with model.image_size N."),
    quality: int = typer.Option(95, "--quality", min=1, max=100, help="JPEG quality."),
    root: Path | None = typer.Option(None, "--root", help="Base folder of the paths in a .lst "
                                     "(default: the .lst's folder)."),
    workers: int | None = typer.Option(None, "--workers", min=1, help="Encoding threads "
                                       "(default: min(4, CPU count))."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the summary as JSON here."),
) -> None:
    """Pack an image folder or .lst into MS1M-layout RecordIO."""
    from data_pipeline.pack import pack_dataset

    if image_size is not None and not resize:
        fail(f"--image-size {image_size} resizes every image; it cannot go with --no-resize, which keeps their "
             "sizes (drop one)", "pfc data pack")
    side = image_size or DEFAULT_PACK_SIZE
    with user_errors("pfc data pack", ValueError, OSError):
        summary = pack_dataset(src, out_prefix, resize=resize, quality=quality, image_size=(side, side),
                               progress=progress, root=root, workers=workers)
    ipi = summary["images_per_identity"]
    typer.echo(f"packed {summary['images']} images of {summary['identities']} identities "
               f"in {summary['seconds']:.1f} s -> {summary['rec']}")
    typer.echo(f"  index {summary['idx']}, property {summary['property']} "
               f"({summary['identities']},{summary['image_size'][0]},{summary['image_size'][1]})")
    typer.echo(f"  images per identity: min {ipi['min']}, max {ipi['max']}, mean {ipi['mean']:.2f}; "
               f"JPEG quality {summary['quality']}" + (f", resized to {side}x{side}" if summary["resized"] else ""))
    if summary["mixed_sizes"]:
        typer.echo("  warning: images have different sizes (use --resize for one size, --image-size N)", err=True)
    if summary["skipped"]:
        typer.echo(f"  skipped {len(summary['skipped'])} unreadable files:", err=True)
        for s in summary["skipped"][:20]:
            typer.echo(f"    {s['path']}: {s['error']}", err=True)
    write_json(json_path, summary)


def _dataset_prefix(arg: Path, command: str) -> Path:
    """A packed dataset's PREFIX from a PREFIX, its ``.rec``/``.idx`` file or a folder holding ``train.rec`` (the
    forms ``--data`` takes, but no image folder: nothing is packed here); none there is one line, exit 2."""
    if arg.suffix in (".rec", ".idx"):
        arg = arg.with_suffix("")
    elif not Path(f"{arg}.rec").is_file() and arg.is_dir() and (arg / "train.rec").is_file():
        arg = arg / "train"
    if not Path(f"{arg}.rec").is_file():
        from data_pipeline.inspect_report import leftover_note

        # a pack killed before its first dataset was whole leaves only temporary files: say so
        left = "".join(leftover_note(p) for p in (arg, *([arg / "train"] if arg.is_dir() else [])))
        fail(f"{arg}.rec: no such record file; give a packed dataset: its PREFIX (PREFIX.rec, PREFIX.idx, "
             f"property), its .rec or .idx file, or a folder holding train.rec (`pfc data pack` makes one){left}",
             command)
    return arg


@data_app.command("inspect")
def inspect_cmd(
    prefix: Path = typer.Argument(..., help="Dataset prefix (PREFIX.rec, PREFIX.idx, property), its .rec or .idx "
                                  "file, or a folder holding train.rec."),
    deep: bool = typer.Option(False, "--deep", help="Also read every image record whole and decode it "
                              "(default: record heads only: structure, labels, key ranges)."),
    quick: bool = typer.Option(False, "--quick", help="Check the header and identity records and a random "
                               "sample of image records (--sample); counts come from the index."),
    sample: int = typer.Option(10000, "--sample", min=1, help="Image records checked with --quick."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --quick sample."),
    progress: bool = typer.Option(False, "--progress/--no-progress", help="Show a progress bar."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the report as JSON here."),
) -> None:
    """Check every record of a dataset and print statistics (exit code 1 when anything is corrupt)."""
    from data_pipeline.checks import format_report, inspect_dataset

    prefix = _dataset_prefix(prefix, "pfc data inspect")
    report = inspect_dataset(prefix, deep=deep, progress=progress, sample=sample if quick else None, seed=seed)
    typer.echo(format_report(report))
    write_json(json_path, report)
    if not report["ok"]:
        raise typer.Exit(code=1)


@data_app.command("pairs")
def pairs_cmd(
    src: Path = typer.Argument(..., help="Image folder (one subfolder per identity) or a dataset prefix."),
    out: Path = typer.Argument(..., help="Output verification .bin."),
    pairs: int = typer.Option(600, "--pairs", min=2, help="Number of pairs (half genuine, half impostor)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same file)."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the summary as JSON here."),
) -> None:
    """Build a verification .bin of genuine/impostor pairs."""
    from data_pipeline.verification import make_pairs

    with user_errors("pfc data pairs", ValueError, OSError):
        summary = make_pairs(src, out, pairs=pairs, seed=seed)
    typer.echo(f"wrote {summary['pairs']} pairs ({summary['genuine']} genuine, "
               f"{summary['impostor']} impostor) from {summary['identities_used']} of "
               f"{summary['identities']} identities, "
               f"{summary['distinct_images']} distinct images -> {summary['out']} (seed {seed})")
    if summary["skipped"]:  # reported as `pfc data pack` reports the files it skips
        typer.echo(f"  skipped {len(summary['skipped'])} unreadable files:", err=True)
        for s in summary["skipped"][:20]:
            typer.echo(f"    {s['path']}: {s['error']}", err=True)
    write_json(json_path, summary)


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
    with contextlib.closing(bar), user_errors("pfc data synth", ValueError, OSError):
        report = generate(out_prefix, identities, images_per_identity, image_size=image_size,
                          val_identities=val_identities, val_pairs=val_pairs, seed=seed, workers=workers,
                          val_bin=val_bin, progress=lambda n: bar.update(n))
    typer.echo(f"wrote {report.images} images of {report.identities} identities "
               f"({report.image_size}x{report.image_size}) -> {report.prefix}.rec "
               f"({report.rec_bytes / 2**20:.1f} MiB)")
    typer.echo(f"  {report.train_seconds:.1f} s for the training set ({report.images_per_s:.0f} images/s on "
               f"{report.workers} workers), {report.seconds:.1f} s in all, {report.cpu_seconds:.1f} CPU-s")
    if report.val_bin:
        typer.echo(f"  verification: {report.val_pairs} pairs of {report.val_identities} unseen identities "
                   f"-> {report.val_bin}")
    write_json(json_path, report.to_dict())
