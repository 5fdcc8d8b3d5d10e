"""`pfc train` and `pfc demo`."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import typer

from launcher.commands.groups import app
from launcher.commands.output import config_or_exit, fail, user_errors
from launcher.config import Config, build_overrides, set_value


def _prepare_or_exit(cfg) -> Path | None:  # type: ignore[no-untyped-def]
    """Before any rank starts: the tracking backends usable, the init_backbone file read, a setting this
    machine's device cannot run (train.amp=fp16 without CUDA), the data found (an image folder packed once);
    a bad path, file or setting is one line, exit 2. Returns the dataset PREFIX that ``data.prefix`` resolved
    to (None: no data.prefix), which :func:`with_resolved_data` hands to the trainer and torchrun's ranks."""
    import torch

    from launcher.errors import rank_from_env
    from launcher.monitoring.trackers import TrackerError, check_backends
    from launcher.trainer.data_paths import resolve_prefix
    from launcher.trainer.finetune import adopt_init_backbone
    from launcher.trainer.kernels import set_cublas_workspace
    from launcher.trainer.progress import setup_logging
    from launcher.trainer.step import check_amp

    set_cublas_workspace(cfg)  # before this process's (and its ranks') first matrix product
    with user_errors("pfc", ValueError, TrackerError):
        check_backends(cfg.log.backends, cfg.log.wandb_mode)
        cfg = adopt_init_backbone(cfg)
        check_amp(cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        if cfg.data.prefix:
            # logging first: packing an image folder (minutes) reports what it packs and how long it took; a
            # rank sets it up again once the process group has given it its rank
            setup_logging(rank_from_env() or 0)
            return resolve_prefix(cfg.data.prefix, cfg.output, cfg.model.image_size)
    return None


def with_resolved_data(config: str, overrides: list[str], cfg: Config, prefix: Path | None) -> tuple[list[str], Config]:
    """``overrides`` and ``cfg`` with ``data.prefix`` set to the dataset PREFIX it resolved to, last so it wins:
    the trainer (here or on torchrun's ranks) opens the packed PREFIX instead of walking an image folder again."""
    if prefix is None or str(prefix) == cfg.data.prefix:
        return overrides, cfg
    overrides = [*overrides, f"data.prefix={set_value(str(prefix))}"]
    return overrides, config_or_exit(config, overrides)


def _check_gpus_or_exit(nproc_per_node: int, backend: str) -> None:
    """Before torchrun starts: with CUDA visible, ``--nproc-per-node`` ranks need that many GPUs on this
    node, one each, unless ``backend`` (``dist.backend``) is gloo, which lets ranks share one. Every rank
    would refuse anyway (``init_distributed``), but only after torchrun started them all, and after an
    image folder was packed; here it is one line, exit 2, nothing started."""
    import torch

    from launcher.distributed import TooFewGpus, cuda_device_index

    if torch.cuda.is_available():
        with user_errors("pfc", TooFewGpus):
            cuda_device_index(nproc_per_node - 1, nproc_per_node, torch.cuda.device_count(), backend=backend)


def _check_torchrun_options_or_exit(nproc_per_node: int | None, nnodes: str, rdzv_endpoint: str | None,
                                    max_restarts: int) -> None:
    """torchrun's options need ``--nproc-per-node``: without it ``pfc train`` runs as this one process (or
    as a rank of an outside launcher) and starts no torchrun, so they would be silently dropped."""
    if nproc_per_node is not None:
        return
    given = [f"{name} {value}" for name, value, unset in (("--nnodes", nnodes, nnodes in ("1", "1:1")),
                                                          ("--rdzv-endpoint", rdzv_endpoint, not rdzv_endpoint),
                                                          ("--max-restarts", max_restarts, max_restarts == 0))
             if not unset]
    if given:
        fail(f"{', '.join(given)} is torchrun's and needs --nproc-per-node N (the ranks pfc train starts on this "
             "node through torchrun); without it pfc train runs as this one process and ignores it")


def _check_rendezvous_options_or_exit(rdzv_endpoint: str | None, rdzv_id: str | None, node_rank: int | None,
                                      rdzv_timeout: float | None) -> None:
    """The options that only a multi-node rendezvous reads need its ``--rdzv-endpoint``: without one,
    torchrun starts ``--standalone`` with a rendezvous id of its own, so they would be silently dropped
    (``--rdzv-id`` is the run's label in the metrics)."""
    if rdzv_endpoint:
        return
    given = [f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"
             for name, value in (("--rdzv-id", rdzv_id), ("--node-rank", node_rank), ("--rdzv-timeout", rdzv_timeout))
             if value is not None]
    if given:
        fail(f"{', '.join(given)} applies to a multi-node launch and needs --rdzv-endpoint HOST:PORT (the "
             "rendezvous every node joins); without it torchrun starts --standalone, which ignores it (to name "
             "the run in the metrics, use --set metrics.run_id=ID)")


@app.command("train", context_settings={"allow_extra_args": False})
def train_cmd(
    config: str = typer.Argument(..., help="YAML file, or a built-in recipe name such as demo_cpu"),
    data: str | None = typer.Option(None, "--data", help="training data: PREFIX (PREFIX.rec/.idx), a .rec/.idx "
                                    "file, a folder holding train.rec, or an image folder (one subfolder per "
                                    "identity; packed once into OUTPUT/data_cache)"),
    val_bin: list[str] | None = typer.Option(None, "--val-bin", help="verification .bin (repeatable)"),
    output: str | None = typer.Option(None, "--output", help="run folder"),
    sets: list[str] | None = typer.Option(None, "--set", help="override: section.field=value (repeatable)"),
    nproc_per_node: int | None = typer.Option(None, "--nproc-per-node", min=1,
                                              help="start torchrun with this many ranks per node"),
    nnodes: str = typer.Option("1", "--nnodes", help="number of nodes (or MIN:MAX) for torchrun"),
    node_rank: int | None = typer.Option(None, "--node-rank", min=0, help="with --rdzv-endpoint: this node's rank"),
    rdzv_endpoint: str | None = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of c10d rendezvous"),
    max_restarts: int = typer.Option(0, "--max-restarts", min=0, help="torchrun restarts after a failure"),
    rdzv_id: str | None = typer.Option(None, "--rdzv-id", help="with --rdzv-endpoint: rendezvous id shared by "
                                       "all nodes of one job (e.g. the SLURM job id)"),
    rdzv_timeout: float | None = typer.Option(None, "--rdzv-timeout", min=1,
                                              help="with --rdzv-endpoint: seconds to wait for all nodes to join "
                                              "(default 600)"),
) -> None:
    """Train from a config, under torchrun (reading its environment) or starting torchrun itself."""
    from launcher.distributed import under_launcher

    if nproc_per_node is not None and nnodes not in ("1", "1:1") and not rdzv_endpoint:
        # torchrun would start --standalone, whose rendezvous no other node can join: it waits forever
        fail(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (the rendezvous every node joins, e.g. the "
             "first node's address and a free port)")
    _check_torchrun_options_or_exit(nproc_per_node, nnodes, rdzv_endpoint, max_restarts)
    _check_rendezvous_options_or_exit(rdzv_endpoint, rdzv_id, node_rank, rdzv_timeout)
    overrides = build_overrides(data, val_bin, output, sets)
    cfg = config_or_exit(config, overrides)
    if not under_launcher():
        from launcher.trainer.run_folder import check_run_folder

        # here, before an image folder is packed into the output and before torchrun: refused in a rank, it
        # would restart the rank (--max-restarts) with the refusal buried in its log
        check_run_folder(cfg)
    if nproc_per_node is not None and not under_launcher():
        _check_gpus_or_exit(nproc_per_node, cfg.dist.backend)
    overrides, cfg = with_resolved_data(config, overrides, cfg, _prepare_or_exit(cfg))
    with kept_run_label(cfg, under_launcher() or bool(rdzv_endpoint)):
        _launch_or_train(cfg, config, overrides, nproc_per_node, nnodes=nnodes, node_rank=node_rank,
                         rdzv_endpoint=rdzv_endpoint, max_restarts=max_restarts, rdzv_id=rdzv_id,
                         rdzv_timeout=rdzv_timeout)


def _launch_or_train(cfg: Config, config: str, overrides: list[str], nproc_per_node: int | None, *, nnodes: str,
                     node_rank: int | None, rdzv_endpoint: str | None, max_restarts: int, rdzv_id: str | None,
                     rdzv_timeout: float | None) -> None:
    """Start torchrun with ``nproc_per_node`` ranks (the other options: its own), or train in this process
    (one rank, or a rank torchrun started)."""
    from launcher.distributed import RendezvousTimeout, init_distributed, shutdown, torchrun, under_launcher
    from launcher.trainer.preemption import STOPPED_EXIT_CODE, StopRequest, rank_stopped_exit_code
    from launcher.trainer.progress import setup_logging

    if nproc_per_node is not None and not under_launcher():
        argv = ["train", config] + [a for o in overrides for a in ("--set", o)]
        started = time.time()
        try:
            code = torchrun(argv, nproc_per_node, nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
                            max_restarts=max_restarts, run_id=rdzv_id, rdzv_timeout=rdzv_timeout, output=cfg.output,
                            stop_signals=cfg.train.stop_signals, stop_grace_s=cfg.train.stop_grace_s)
        except RendezvousTimeout as e:
            fail(str(e), code=3)
        if stopped_since(Path(cfg.output), started):
            code = STOPPED_EXIT_CODE  # the ranks exited 0 so that torchrun would not restart them
        raise typer.Exit(code=code)
    from launcher.trainer.loop import train

    # Handlers first: a stop signal that arrives during the rendezvous or data loading is kept and acted on
    # at the first step boundary instead of killing the rank.
    stop = StopRequest(cfg.train.stop_signals).install()
    try:
        ctx = init_distributed(cfg.dist.backend, cfg.dist.timeout_s, single_rank_group=wants_one_rank_group(cfg))
    except BaseException:
        stop.restore()  # a caller that goes on (pfc train inside another process) gets its handlers back
        raise
    setup_logging(ctx.rank)
    try:
        summary = train(cfg, ctx, stop=stop)
    finally:
        shutdown(ctx)
        stop.restore()
    if summary.get("stopped"):
        st = summary["stopped"]
        if ctx.is_main:
            typer.echo(f"run stopped by {st['signal']} after step {st['step']}; checkpoint: {st['checkpoint']}; "
                       f"exit code {STOPPED_EXIT_CODE} (resume with the same command)")
        raise typer.Exit(code=rank_stopped_exit_code())
    if ctx.is_main:
        typer.echo(f"run finished: {summary['steps']} steps in {summary['seconds']:.1f}s -> {cfg.output}")


@contextlib.contextmanager
def kept_run_label(cfg: Config, elsewhere: bool) -> Iterator[None]:
    """A resume started here (in this process, or by torchrun ``--standalone``, whose rendezvous id is new
    at every launch) keeps the ``run`` label of the launch it resumes, read from ``<output>/run_id``: the
    dashboards and the alerts that compare a run with its own past (``PfcVerificationAccuracyFell``: a bad
    resume) see one run, as under SLURM, Kubernetes or a multi-node rendezvous, whose ids survive a resume.
    A fresh start (nothing to resume) gets a new id; an id set by the config or the environment wins, and so
    does a rendezvous id (``elsewhere``: torchrun started by hand, or a multi-node rendezvous). Within the
    block ``PFC_RUN_ID`` holds the kept id (torchrun's ranks inherit it; ``resolve_run_id`` reads it); the
    process's environment is put back after it (`pfc train` inside another process)."""
    import os

    from launcher.monitoring.exporter import kept_run_id
    from launcher.trainer.run_folder import resume_point

    taken = elsewhere or cfg.metrics.run_id or any(os.environ.get(k) for k in ("SLURM_JOB_ID", "PFC_RUN_ID"))
    kept = kept_run_id(cfg.output) if not taken and resume_point(cfg) is not None else None
    if not kept:
        yield
        return
    before = os.environ.get("PFC_RUN_ID")  # unset or empty
    os.environ["PFC_RUN_ID"] = kept
    try:
        yield
    finally:
        if before is None:
            del os.environ["PFC_RUN_ID"]
        else:
            os.environ["PFC_RUN_ID"] = before


def wants_one_rank_group(cfg: Config) -> bool:
    """Whether one rank alone still gets a process group: DeepSpeed needs one, and ``dist.group_for_one_rank``
    asks for one so that the multi-rank code paths (DDP, the agreements, the gathers) run on a single device."""
    return bool(cfg.dist.engine == "deepspeed" or cfg.dist.group_for_one_rank)


def stopped_since(output: Path, started: float) -> bool:
    """Did this launch's ranks stop on a signal? (rank 0's ``summary.json``, written after ``started``)."""
    f = output / "summary.json"
    try:
        return f.stat().st_mtime >= started - 1 and bool(json.loads(f.read_text()).get("stopped"))
    except (OSError, ValueError):
        return False


@app.command("demo")
def demo_cmd(
    output: str = typer.Option("runs/demo", "--output", help="run folder (data goes in OUTPUT/data)"),
    identities: int = typer.Option(300, "--identities", min=10),
    images_per_identity: int = typer.Option(12, "--images-per-identity", min=2),
    steps: int | None = typer.Option(None, "--steps", min=1, help="override train.steps"),
    nproc: int = typer.Option(2, "--nproc", min=1,
                              help="ranks: on the CPU, or on the GPU(s) where CUDA is visible"),
    sets: list[str] | None = typer.Option(None, "--set", help="extra config overrides"),
) -> None:
    """Synthetic identities -> 2 ranks (on the CPU, or the GPU(s) where CUDA is visible) of Partial FC +
    DiscFace -> evaluation on unseen identities."""
    from launcher.demo import run_demo

    code = run_demo(Path(output), identities=identities, images_per_identity=images_per_identity,
                    steps=steps, nproc=nproc, extra_sets=list(sets or []))
    if code:
        sys.exit(code)
