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
    device_data: bool = typer.Option(False, "--device-data", help="random uint8 batches made on the device "
                                     "(data.loader=synthetic): the step without any input pipeline"),
    floor: bool = typer.Option(False, "--floor", help="also time the backbone's forward + backward alone "
                               "(one rank, this process) and report the step against it"),
    json_path: Path | None = typer.Option(None, "--json", help="write the result here"),
) -> None:
    """Training throughput and step-time split (data wait, forward, backward, communication, optimizer)."""
    from launcher.bench.train_speed import backbone_floor, bench_train

    res = bench_train(config, data, steps, warmup, nproc, list(sets or []), device_data=device_data)
    typer.echo(f"{res['backbone']} {res['image_size']}px, {res['world_size']} rank(s) x {res['batch_per_rank']}: "
               f"{res['images_per_s']:.1f} images/s, step {res['step_s'] * 1e3:.1f} ms, "
               f"peak memory rank 0 {res['peak_memory_bytes_rank0'] / 2**20:.0f} MiB")
    for k, v in res["split_s"].items():
        typer.echo(f"  {k[5:-2]:<10s} {v * 1e3:8.1f} ms  ({res['split_fraction'][k]:.0%})")
    if floor:
        fl = backbone_floor(config, list(sets or []), steps, warmup)
        res["backbone_floor"] = fl
        # Per rank: the floor runs one rank's batch alone.
        res["step_over_floor_images_per_s"] = (res["images_per_s"] / res["world_size"]) / fl["images_per_s"]
        mem = f", peak memory {fl['peak_memory_bytes'] / 2**20:.0f} MiB" if fl["peak_memory_bytes"] else ""
        typer.echo(f"backbone forward + backward alone: {fl['images_per_s']:.1f} images/s{mem}; the whole step "
                   f"reaches {res['step_over_floor_images_per_s']:.2f} of it (per rank)")
    if json_path is not None:
        json_path.write_text(json.dumps(res, indent=2))


@bench_app.command("discface")
def bench_discface_cmd(
    output: Path = typer.Option(Path("runs/discface_study"), "--output", help="study folder"),
    config: str = typer.Option("demo_cpu", "--config", help="config file or recipe name"),
    lambdas: str = typer.Option("0,0.1", "--lambdas", help="comma-separated DiscFace lambdas (0 = off)"),
    identities: int = typer.Option(1000, "--identities", min=10),
    images_per_identity: int = typer.Option(10, "--images-per-identity", min=2),
    heldout_identities: int = typer.Option(200, "--heldout-identities", min=2),
    steps: int | None = typer.Option(None, "--steps", min=1, help="override train.steps"),
    nproc: int = typer.Option(2, "--nproc", min=1),
    hard: bool = typer.Option(False, "--hard", help="stronger synthetic nuisance (pose, light, noise)"),
    sets: list[str] | None = typer.Option(None, "--set", help="config override section.field=value"),
    json_path: Path | None = typer.Option(None, "--json", help="also write the result here"),
) -> None:
    """DiscFace off vs on, same seeds: held-out verification and both discrepancies."""
    from launcher.bench.discface_study import discface_study, format_study

    lams = [float(x) for x in lambdas.split(",") if x.strip()]
    res = discface_study(output.resolve(), config=config, lambdas=lams, identities=identities,
                         images_per_identity=images_per_identity, heldout_identities=heldout_identities,
                         steps=steps, nproc=nproc, sets=list(sets or []), hard=hard)
    typer.echo(format_study(res))
    if json_path is not None:
        json_path.write_text(json.dumps(res, indent=2, default=float))


@bench_app.command("augment")
def bench_augment_cmd(
    output: Path = typer.Option(Path("runs/augment_study"), "--output", help="study folder"),
    config: str = typer.Option("demo_cpu", "--config", help="config file or recipe name"),
    seeds: str = typer.Option("0,1", "--seeds", help="comma-separated training seeds (each: off and on)"),
    identities: int = typer.Option(30, "--identities", min=2),
    images_per_identity: int = typer.Option(10, "--images-per-identity", min=2),
    val_identities: int = typer.Option(100, "--val-identities", min=2, help="unseen identities of the pairs"),
    val_pairs: int = typer.Option(3000, "--val-pairs", min=20),
    steps: int | None = typer.Option(None, "--steps", min=1, help="override train.steps"),
    nproc: int = typer.Option(1, "--nproc", min=1),
    hard: bool = typer.Option(True, "--hard/--default-jitter", help="strong synthetic nuisance (HARD_JITTER)"),
    sets: list[str] | None = typer.Option(None, "--set", help="config override of both runs: section.field=value"),
    augment_sets: list[str] | None = typer.Option(
        None, "--augment", help="the 'on' run's data.augment overrides (default: the finetune_small recipe's)"),
    json_path: Path | None = typer.Option(None, "--json", help="also write the result here"),
) -> None:
    """Augmentation off vs on (data.augment), same data and seeds: verification on unseen identities."""
    from launcher.bench.augment_study import augment_study, format_augment_study

    seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    if not seed_list:
        raise typer.BadParameter("give at least one seed", param_hint="--seeds")
    res = augment_study(output.resolve(), config=config, seeds=seed_list, identities=identities,
                        images_per_identity=images_per_identity, val_identities=val_identities,
                        val_pairs=val_pairs, steps=steps, nproc=nproc, sets=list(sets or []),
                        augment_sets=list(augment_sets) if augment_sets else None, hard=hard)
    typer.echo(format_augment_study(res))
    if json_path is not None:
        json_path.write_text(json.dumps(res, indent=2, default=float))
