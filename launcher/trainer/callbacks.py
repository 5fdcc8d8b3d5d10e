"""What the loop does after each step besides training, as one small set of named calls.

:meth:`RunCallbacks.after_step` runs, in this order: count a non-finite step (:meth:`account`), log and
export the step's values (:meth:`observe`), evaluate on the verification sets and keep the best backbone
(:meth:`evaluate_every`), save a checkpoint (:meth:`checkpoint_every`). A stop signal that every rank
agreed on ends the run through :meth:`save_on_stop`. The callbacks own the run's outputs besides the
checkpoints: the Prometheus exporter, ``metrics.jsonl`` and the console, the trackers, ``best/``.
Evaluations and saves tell the hang watchdog at their start and end (:meth:`long_phase`); their time, and
the discrepancy measurements', is no step's time (images/s and the step-time histogram leave it out).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from discface import discrepancy_stats
from launcher.config import Config
from launcher.distributed import DistContext
from launcher.monitoring.exporter import TrainingMetrics, resolve_run_id
from launcher.monitoring.trackers import Trackers
from launcher.trainer import faults
from launcher.trainer.batches import TrainData
from launcher.trainer.checkpoint_files import CheckpointPaths, CheckpointWriteError
from launcher.trainer.checkpointer import Checkpointer
from launcher.trainer.components import Components
from launcher.trainer.evaluation import evaluate_bins
from launcher.trainer.finetune import BestKeeper
from launcher.trainer.progress import ProgressLogger
from launcher.trainer.step import NonFiniteError, NonFiniteSteps, measures_discrepancy
from launcher.trainer.watchdog import HangWatchdog
from partialfc import PartialFC

log = logging.getLogger("pfc")

# The step's own values (lr: the one the step ran at); loss_avg is the smoothed loss.
_LOGGED = ("loss", "loss_softmax", "loss_disc", "lr", "grad_norm", "xi_norm", "images", "time_data_s",
           "time_forward_s", "time_backward_s", "time_comm_s", "time_optimizer_s")


def due(step: int, every: int, end: int) -> bool:
    """Whether something done every ``every`` steps and at step ``end`` is due after ``step``."""
    return step % every == 0 or step == end


def owned_discrepancy(head: PartialFC) -> dict[str, float]:
    """Directional and radial discrepancy of this rank's owned samples of the last step (cheap)."""
    if head.record is None or len(head.record.owned_labels) == 0:
        return {}
    z_hat, w_hat, labels = head.record.owned_z_hat, head.record.owned_w_hat, head.record.owned_labels
    xi = head.xi.detach() if head.xi is not None else None
    stats = discrepancy_stats(z_hat, w_hat, labels, xi=xi.to(z_hat.dtype) if xi is not None else None)
    # A step whose owned samples hold no class twice has no discrepancy (NaN): leave it out of the averages.
    return {f"discrepancy_{k}": v for k, v in stats.items() if not k.startswith("num_") and math.isfinite(v)}


class RunCallbacks:
    """The loop's hooks and the run's outputs; a context manager that closes them (every rank)."""

    def __init__(self, c: Components, cfg: Config, ctx: DistContext, data: TrainData, checkpointer: Checkpointer,
                 last_step: int, watchdog: HangWatchdog | None = None, start_step: int = 0) -> None:
        self.c, self.cfg, self.ctx, self.data, self.checkpointer = c, cfg, ctx, data, checkpointer
        self.last_step = last_step
        self.watchdog = watchdog
        out = Path(cfg.output)
        self.metrics = TrainingMetrics(cfg.metrics, rank=ctx.rank, local_rank=ctx.local_rank, node=ctx.node_rank,
                                       world_size=ctx.world_size, comm_timed=c.engine.comm is not None,
                                       run=resolve_run_id(cfg.metrics, out, write=ctx.is_main))
        # the trackers first: their start (wandb's, seconds) is no step's time, and the progress clock starts here
        self.trackers = Trackers(cfg.log.backends, out, enabled=ctx.is_main, wandb_project=cfg.log.wandb_project,
                                 wandb_mode=cfg.log.wandb_mode, run_config=cfg.model_dump(mode="json"))
        self.progress = ProgressLogger(cfg.train.steps, cfg.train.batch_size * ctx.world_size * cfg.optim.grad_accum,
                                       ctx.device, out / "metrics.jsonl" if "jsonl" in cfg.log.backends else None,
                                       enabled=ctx.is_main)
        self.best = BestKeeper(cfg, ctx.is_main, resumed_at=start_step)
        self.nonfinite = NonFiniteSteps(cfg.train.max_nonfinite_in_a_row)
        self.ckpt_failures = 0
        self.saved_step = -1  # step of the last successful save of this run
        self.evals: dict[str, Any] | None = None  # the last evaluation
        self.stopped: dict[str, Any] | None = None  # set when a stop signal ended the run

    @contextlib.contextmanager
    def long_phase(self, step: int) -> Iterator[None]:
        """An evaluation or a save after ``step``: progress for the hang watchdog at its start and at its end.

        The watchdog stops the run when a rank makes no progress for ``dist.timeout_s``; without these, the
        step, the evaluation and the save together had to fit in it (a large head written to a shared file
        system, many verification sets). Each phase alone must still, as each collective in it must."""
        if self.watchdog is not None:
            self.watchdog.progress(step)
        try:
            faults.maybe_slow_phase(step, self.ctx.rank)
            yield
        finally:  # also after a failed save (a full disk), which the run survives: its time was no step's
            self.progress.not_step_time()  # images/s is the steps'; the ETA still counts this time
            self.metrics.not_step_time()
        if self.watchdog is not None:
            self.watchdog.progress(step)

    def __enter__(self) -> RunCallbacks:
        self.metrics.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.close()
        self.metrics.close()
        self.trackers.close()

    def after_step(self, step: int, scalars: dict[str, float]) -> None:
        """Everything after optimizer step ``step`` (``scalars``: :func:`~launcher.trainer.step.train_one_step`'s)."""
        try:
            self.account(step, scalars)
        except NonFiniteError:  # the step that stops the run is its last: exported and logged, as a last step is
            self.observe(step, scalars, last=True)
            raise
        self.observe(step, scalars)
        self.evaluate_every(step)
        self.checkpoint_every(step)

    def account(self, step: int, scalars: dict[str, float]) -> None:
        self.progress.tick(scalars.get("images"))
        self.nonfinite.account(scalars, step)
        if scalars["finite"]:
            self.progress.update(loss_avg=scalars["loss"])  # smoothed over the last steps of this process

    def observe(self, step: int, scalars: dict[str, float], last: bool = False) -> None:
        """The step's values to the exporter, and every ``log.every_steps`` (and a ``last`` step) to the log and the
        trackers."""
        cfg, head = self.cfg, self.c.head
        self.metrics.observe_step(step, scalars, images=int(scalars["images_rank"]),
                                  sampled_classes=head.record.num_sampled if head.record else 0,
                                  skipped_records=self.data.skipped_records)
        if measures_discrepancy(step, cfg):
            disc = owned_discrepancy(head)
            self.progress.latest.update(disc)  # the last measured values, as the exporter's
            self.metrics.observe_discrepancy(disc)
            self.progress.not_step_time()
        if last or due(step, cfg.log.every_steps, self.last_step):
            # xi_norm is 0.0 with DiscFace off: no xi then, left out rather than logged as a norm of 0
            logged = self.progress.emit(step, {k: scalars[k] for k in _LOGGED
                                               if k in scalars and (k != "xi_norm" or head.xi is not None)})
            self.trackers.scalars(step, logged)

    def evaluate_every(self, step: int) -> None:
        """Every ``eval.every_steps`` and at ``train.steps``: the verification sets (collective), best/."""
        cfg = self.cfg
        if not cfg.data.val_bins or not due(step, cfg.eval.every_steps, cfg.train.steps):
            return
        roc_dir = Path(cfg.output) / "roc" if self.trackers.wants_roc else None
        with self.long_phase(step):  # the sets, then best/ (rank 0 may write a backbone there)
            evals = evaluate_bins(self.c.engine.module, cfg.data.val_bins, cfg, self.ctx, roc_dir=roc_dir)
            self.metrics.observe_eval(evals)
            self.trackers.evaluation(step, evals)
            self.c.engine.train()
            self.progress.emit(step, {f"val_{Path(k).stem}_{m}": v[m] for k, v in evals.items()
                                      for m in ("accuracy", "accuracy_std")}, quiet=True)
            self.evals = evals
            self.best.observe(step, evals, self.c.engine.module, self.c.backbone_config)

    def checkpoint_every(self, step: int) -> None:
        """Every ``checkpoint.every_steps`` and at the last step. No save while steps are being skipped: the
        last checkpoint predates the first bad step. A failed save (a full disk) is logged and retried at the
        next interval, up to ``checkpoint.max_failures_in_a_row``."""
        if self.nonfinite.in_a_row or not due(step, self.cfg.checkpoint.every_steps, self.last_step):
            return
        t0 = time.perf_counter()
        try:
            with self.long_phase(step):
                self.checkpointer.save(step)
        except CheckpointWriteError as e:
            # Training state is intact in memory: keep going and try again at the next interval.
            self.ckpt_failures += 1
            log.error(f"step {step}: {e} ({self.ckpt_failures} failed save(s) in a row)")
            if self.ckpt_failures >= self.cfg.checkpoint.max_failures_in_a_row:
                raise
            return
        self.ckpt_failures = 0
        self.saved_step = step
        self.metrics.observe_checkpoint(time.perf_counter() - t0)

    def save_on_stop(self, step: int, signum: int) -> None:
        """Every rank agreed to stop after ``step``: save there (unless just saved, or steps are being skipped
        as non-finite, when the last checkpoint must stay the newest). A failed save raises: no silent loss."""
        path: Path | None = None
        if self.saved_step == step:
            path = CheckpointPaths(self.checkpointer.root).latest()
        elif self.nonfinite.in_a_row == 0:
            with self.long_phase(step):
                path = self.checkpointer.save(step)
            self.saved_step = step
        name = signal.Signals(signum).name
        log.warning(f"{name}: stopped after step {step}; "
                    + (f"checkpoint {path}" if path else "no checkpoint (non-finite steps being skipped)"))
        self.stopped = {"signal": name, "step": step, "checkpoint": str(path) if path else None}

    def summary(self, step: int, seconds: float) -> dict[str, Any]:
        """The run summary (same on every rank)."""
        return {"steps": step, "seconds": seconds, "skipped_nonfinite": self.nonfinite.skipped,
                "loss_scale_backoffs": self.nonfinite.scale_backoffs,
                "skipped_records": self.data.skipped_records, "final": self.progress.last, "eval": self.evals or {},
                "world_size": self.ctx.world_size, "stopped": self.stopped}
