"""The training loop: data -> backbone (DDP or DeepSpeed) -> Partial FC (+ DiscFace) -> backward -> steps.

:func:`train` reads as torchtitan's train loop and torchvision's ``references/classification/train.py``
do: check the run, load the data, build the model (``components``), resume (``checkpointer``), then
:func:`train_steps`: :func:`~launcher.trainer.step.train_one_step` and the callbacks after each step
(``callbacks``: logs, metrics, evaluation, checkpoints), until the last step or an agreed stop signal.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from data_pipeline.atomic import atomic_write
from launcher import strict_json
from launcher.config import Config, dump_config
from launcher.distributed import DistContext
from launcher.trainer import faults
from launcher.trainer.batches import TrainData, load_data
from launcher.trainer.callbacks import RunCallbacks
from launcher.trainer.checkpointer import training_checkpointer
from launcher.trainer.components import Components, build
from launcher.trainer.finetune import adopt_init_backbone, set_backbone_mode
from launcher.trainer.kernels import kernel_settings
from launcher.trainer.preemption import StopRequest
from launcher.trainer.profiling import step_profiler
from launcher.trainer.run_folder import check_run_folder, resume_point
from launcher.trainer.step import check_amp, train_one_step
from launcher.trainer.watchdog import HangWatchdog, watching


def train(cfg: Config, ctx: DistContext, stop: StopRequest | None = None) -> dict[str, Any]:
    """Run the configured training on this rank; returns the run summary (same on every rank, but for
    ``device``: each rank's own; rank 0's is the one in ``summary.json``).

    ``stop``: the stop-signal handlers (installed here from ``train.stop_signals`` when not given); a
    stop signal ends the run after a checkpoint, with ``summary["stopped"]`` set.
    """
    own_stop = stop is None
    stop = StopRequest(cfg.train.stop_signals).install() if stop is None else stop
    try:
        with kernel_settings(cfg, ctx.device) as kernels:  # before the run's first kernel: cuBLAS reads it once
            return _train(cfg, ctx, stop, kernels)
    finally:
        if own_stop:
            stop.restore()


def _train(cfg: Config, ctx: DistContext, stop: StopRequest, kernels: dict[str, Any]) -> dict[str, Any]:
    cfg = adopt_init_backbone(cfg)  # the architecture of checkpoint.init_backbone's file
    check_run_folder(cfg, write=ctx.local_rank == 0)
    check_amp(cfg, ctx.device)
    data = load_data(cfg, ctx)
    c = build(cfg, ctx, data.num_classes)
    checkpointer = training_checkpointer(c, cfg, ctx, data)
    step = checkpointer.maybe_resume(resume_point(cfg))
    write_run_config(cfg, ctx)
    data.seek(step)
    last_step = min(cfg.train.steps, cfg.train.stop_after or cfg.train.steps)
    t_start = time.perf_counter()
    try:
        with watching(ctx, cfg.dist.timeout_s) as watchdog, \
                RunCallbacks(c, cfg, ctx, data, checkpointer, last_step, watchdog, step) as callbacks:
            step = train_steps(c, data, cfg, ctx, step, callbacks, stop, watchdog)
    finally:
        data.close()
    summary = callbacks.summary(step, time.perf_counter() - t_start)
    summary["kernels"] = kernels
    summary["device"] = device_record(ctx.device)
    if ctx.is_main:
        # strict JSON: the last loss of a run that ended on a skipped step is null, not NaN
        atomic_write(Path(cfg.output) / "summary.json", strict_json.dumps(summary, indent=2))
    return summary


def device_record(device: torch.device) -> dict[str, Any]:
    """What ``summary.json``'s ``device`` holds: the device ``type`` this rank trained on (``cuda``, ``cpu``)
    and, on CUDA, the card's ``name`` (None elsewhere). Rank 0 writes the summary, so it is rank 0's."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"type": device.type, "name": name}


def write_run_config(cfg: Config, ctx: DistContext) -> None:
    """Rank 0 writes ``config.yaml`` once the resume has accepted it: every value in it is the one in effect."""
    if ctx.is_main:
        out = Path(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.yaml", dump_config(cfg))


def train_steps(c: Components, data: TrainData, cfg: Config, ctx: DistContext, step: int, callbacks: RunCallbacks,
                stop: StopRequest, watchdog: HangWatchdog | None) -> int:
    """Train from ``step`` to ``callbacks.last_step`` or an agreed stop signal; returns the step reached."""
    c.engine.train()
    profiler = step_profiler(ctx.rank, ctx.device)  # `pfc bench train --profile`
    try:
        while step < callbacks.last_step:
            step += 1
            set_backbone_mode(c.engine, cfg, step)
            if profiler is not None:
                profiler.before(step)
            scalars = train_one_step(c, data, cfg, ctx, step)
            callbacks.after_step(step, scalars)
            if profiler is not None:
                profiler.after(step)
            # one all-reduce of the stop flag: every rank stops after the same step (the last step just ends)
            signum = stop.agreed(ctx) if step < callbacks.last_step else 0
            if signum:
                callbacks.save_on_stop(step, signum)
                break
            if watchdog is not None:
                watchdog.progress(step)
            faults.maybe_kill(step, ctx.rank)
    except BaseException:
        if profiler is not None:
            profiler.abandon()
        raise
    if profiler is not None:
        profiler.close()  # what it recorded, also when a stop signal ended the run early
    return step
