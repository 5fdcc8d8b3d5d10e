"""`pfc bench data|head|train|discface|augment`: the benchmarks, each printing its figures (and writing
them as JSON with ``--json``)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TypeVar

import typer

from launcher.commands.groups import bench_app
from launcher.commands.output import fail, user_errors, write_json

T = TypeVar("T", int, float)

_BENCH_DATA = "pfc bench data"  # how its user errors begin


class LoaderKind(str, Enum):
    dali = "dali"
    torch = "torch"


def _comma_list(text: str, kind: type[T], option: str) -> list[T]:
    """A comma-separated option as a list of ``kind``; a bad item is typer's usage error naming the option."""
    try:
        return [kind(x) for x in text.split(",") if x.strip()]  # type: ignore[call-arg]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of {kind.__name__}s",
                                 param_hint=option) from None


@bench_app.command("data")
def bench_data_cmd(
    ctx: typer.Context,
    prefix: Path | None = typer.Argument(None, help="Dataset prefix (PREFIX.rec, PREFIX.idx, property), a "
                                         "folder holding train.rec, or PREFIX.rec (not with --scale)."),
    loader: LoaderKind | None = typer.Option(None, "--loader", help="Which loader to measure (default torch). "
                                             "With --scale: dali adds the DALI step (needs DALI), torch leaves "
                                             "it out; default: the DALI step where DALI imports."),
    threads: int = typer.Option(2, "--threads", min=0, help="DataLoader workers (torch) or DALI threads; "
                                "the decode ceiling uses the same number."),
    batch: int = typer.Option(128, "--batch", min=1, help="Batch size."),
    seconds: float = typer.Option(10.0, "--seconds", min=0.1, help="Measured seconds for each of the loader "
                                  "and the decode ceiling."),
    device_id: int | None = typer.Option(None, "--device-id", min=0, help="DALI on this GPU (mixed decode); "
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

    _check_device_id(device_id, loader, scale)
    if scale is not None:
        _refuse_loader_options(ctx, prefix)
        _scale(scale, identities, world_size, workdir, keep, loader, json_path)
        return
    _refuse_scale_options(ctx)
    if prefix is None:
        fail("give a dataset PREFIX (or --scale N)", _BENCH_DATA)
    loader = loader or LoaderKind.torch
    if loader is LoaderKind.dali:
        from data_pipeline.dali_iterator import dali_available

        if not dali_available():
            fail("--loader dali needs NVIDIA DALI (pip install 'partialfc-discface[dali]')", _BENCH_DATA)
    with user_errors(_BENCH_DATA, ValueError, OSError):
        res = bench_data(default_prefix(prefix), loader.value, threads=threads, batch_size=batch,
                         seconds=seconds, device_id=device_id, rounds=rounds, uint8=not as_float)
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
    write_json(json_path, res.to_dict())


def _check_device_id(device_id: int | None, loader: LoaderKind | None, scale: int | None) -> None:
    """``--device-id`` is the GPU of DALI's mixed decode: refused where nothing would use it (the torch
    loader and ``--scale`` decode on the CPU, and the result said "on cpu" as if the option were not
    given) and where that GPU is not visible (DALI's own error is a traceback)."""
    if device_id is None:
        return
    if scale is not None or loader is not LoaderKind.dali:
        used_by = "--scale" if scale is not None else "--loader torch"
        fail(f"--device-id {device_id} is for --loader dali's GPU decode; {used_by} decodes on the CPU "
             "(leave --device-id out)", _BENCH_DATA)
    import torch

    visible = torch.cuda.device_count()
    if device_id >= visible:
        fail(f"--device-id {device_id}: no such CUDA device ({visible} visible); leave it out to decode "
             "on the CPU", _BENCH_DATA)


# The options of the loader's throughput measurement: --scale builds its own file, decodes nothing and times
# fixed steps (the DALI step's batch and threads are its own), so each would be silently ignored there.
_LOADER_ONLY = {"threads": "--threads", "batch": "--batch", "seconds": "--seconds", "rounds": "--rounds",
                "as_float": "--float"}
# and the reverse: the options of --scale, which a measurement on a PREFIX would silently ignore
_SCALE_ONLY = {"identities": "--identities", "world_size": "--world-size", "workdir": "--workdir", "keep": "--keep"}


def _given(ctx: typer.Context, options: dict[str, str]) -> list[str]:
    """The ``options`` (parameter name: flag) the user gave on the command line (``--threads 2`` as much as
    ``--threads 3``: a default typed out is still a request)."""
    def on_command_line(name: str) -> bool:
        source = ctx.get_parameter_source(name)  # typer's own copy of click's ParameterSource: by name
        return source is not None and source.name == "COMMANDLINE"

    return [flag for name, flag in options.items() if on_command_line(name)]


def _refuse(given: list[str], why: str) -> None:
    """One line naming the ``given`` options that the measurement asked for would ignore, and ``why``."""
    if given:
        fail(f"{', '.join(given)}: {why} (leave {'it' if len(given) == 1 else 'them'} out)", _BENCH_DATA)


def _refuse_loader_options(ctx: typer.Context, prefix: Path | None) -> None:
    """With ``--scale``: one line for a PREFIX or a loader-throughput option the user gave."""
    _refuse((["PREFIX"] if prefix is not None else []) + _given(ctx, _LOADER_ONLY),
            "for the loader's throughput on a PREFIX; --scale N times its own file's inspect, opening and DALI "
            "epoch boundary, decoding nothing")


def _refuse_scale_options(ctx: typer.Context) -> None:
    """Without ``--scale``: one line for an option only ``--scale`` uses."""
    _refuse(_given(ctx, _SCALE_ONLY), "only with --scale N (the synthetic N-image file); the loader's throughput "
            "on a PREFIX reads that dataset as it is")


def _scale(images: int, identities: int | None, world_size: int, workdir: Path | None, keep: bool,
           loader: LoaderKind | None, json_path: Path | None) -> None:
    """``--scale``: the DALI step runs with ``--loader dali`` (refused in one line without DALI), not with
    ``--loader torch``, and where DALI imports when ``--loader`` is not given."""
    from data_pipeline.dali_iterator import dali_available
    from data_pipeline.scale_bench import bench_scale

    if identities is not None and identities > images:
        fail(f"--identities {identities} is more than --scale {images} images", _BENCH_DATA)
    dali = None if loader is None else loader is LoaderKind.dali
    if dali and not dali_available():
        fail("--loader dali needs NVIDIA DALI (pip install 'partialfc-discface[dali]'); leave --loader out to "
             "skip the DALI step", _BENCH_DATA)
    res = bench_scale(images, identities, workdir, world_size, keep, dali=dali)
    b, ic, ih = res["build"], res["inspect_cold"], res["inspect_cached"]
    load = res["load_average_start"]  # None where the OS does not report it
    typer.echo(f"{images} images, {res['identities']} identities on {res['cpu_count']} CPUs ({res['cpu']}), "
               f"load average {'n/a' if load is None else f'{load:.2f}'}")
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
    else:
        typer.echo(f"  DALI            not measured ({'--loader torch' if dali is False else 'DALI does not import'})")
    write_json(json_path, res)


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
    dtype: str = typer.Option("fp32", "--dtype", help="Head weight dtype (head.dtype): fp32|bf16|fp16; bf16/fp16 "
                                                      "store the shard and its SGD momentum in half the bytes."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="Head optimizer (optim.name): sgd|adamw, with the "
                                                             "trainer's default hyper-parameters."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="K micro-batches of --batch per timed optimizer step "
                                                           "(optim.grad_accum); the step time covers all K."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the result as JSON here."),
) -> None:
    """Partial FC head step time against its GEMM floor, memory and traffic per rank."""
    from launcher.bench.head_results import format_summary
    from launcher.bench.head_step import BenchConfig, run_bench

    cfg = BenchConfig(num_classes=classes, dim=dim, batch=batch, sample_rate=sample_rate,
                      world_size=world_size, steps=steps, warmup=warmup, discface_lambda=discface_lambda,
                      seed=seed, threads=threads, floor=floor, profile_dir=str(profile_dir) if profile_dir else None,
                      head_dtype=dtype, optimizer=optimizer, grad_accum=grad_accum)
    try:
        cfg.validate()
    except ValueError as err:
        fail(str(err), "pfc bench head")
    result = run_bench(cfg)
    typer.echo(format_summary(result))
    if profile_dir is not None:
        typer.echo(f"profiles in {profile_dir}/profile_rank*.txt, traces in {profile_dir}/trace_rank*.json")
    write_json(json_path, result, announce=True)


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
    workdir: Path | None = typer.Option(None, "--workdir", help="where the generated data and the run folder go "
                                        "(default a temporary folder); they are deleted afterwards unless --keep"),
    keep: bool = typer.Option(False, "--keep", help="keep the generated data and the run folder"),
    profile_dir: Path | None = typer.Option(
        None, "--profile", help="write a torch.profiler table and trace per rank into this folder, of the timed "
                                "steps but the last (the profiler inflates the step times reported)"),
) -> None:
    """Training throughput and step-time split (data wait, forward, backward, communication, optimizer)."""
    from launcher.bench.train_speed import backbone_floor, bench_train
    from launcher.trainer import profiling

    # The timed steps but the last, which ends the run with its final checkpoint; the ranks (torchrun's
    # children) inherit the environment, which says "no profile" without --profile.
    first, last = warmup + 1, warmup + steps - 1
    with profiling.profile_environment(profile_dir, first, last):
        res = bench_train(config, data, steps, warmup, nproc, list(sets or []), workdir=workdir,
                          device_data=device_data, keep=keep)
    if profile_dir is not None:
        res["profiled_steps"] = [first, last]  # their times (in the medians) are inflated by the profiler
    card = f" ({res['device_name']})" if res["device_name"] else ""
    typer.echo(f"{res['backbone']} {res['image_size']}px on {res['device']}{card}, {res['world_size']} rank(s) x "
               f"{res['batch_per_rank']} (steps {res['timed_step_range'][0]}-{res['timed_step_range'][1]} timed): "
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
    if res["workdir"]:
        typer.echo(f"the run folder (and any data generated) kept in {res['workdir']}")
    if profile_dir is not None:
        typer.echo(f"profiles of steps {first}-{last} (their times inflated by the profiler) in "
                   f"{profile_dir}/profile_rank*.txt, traces in {profile_dir}/trace_rank*.json")
    write_json(json_path, res)


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

    lams = _comma_list(lambdas, float, "--lambdas")
    res = discface_study(output.resolve(), config=config, lambdas=lams, identities=identities,
                         images_per_identity=images_per_identity, heldout_identities=heldout_identities,
                         steps=steps, nproc=nproc, sets=list(sets or []), hard=hard)
    typer.echo(format_study(res))
    write_json(json_path, res)


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

    seed_list = _comma_list(seeds, int, "--seeds")
    if not seed_list:
        raise typer.BadParameter("give at least one seed", param_hint="--seeds")
    res = augment_study(output.resolve(), config=config, seeds=seed_list, identities=identities,
                        images_per_identity=images_per_identity, val_identities=val_identities,
                        val_pairs=val_pairs, steps=steps, nproc=nproc, sets=list(sets or []),
                        augment_sets=list(augment_sets) if augment_sets else None, hard=hard)
    typer.echo(format_augment_study(res))
    write_json(json_path, res)
