"""Prometheus exporter for training: every rank serves its own ``/metrics`` (port = base + local rank).

Each rank owns a private :class:`prometheus_client.CollectorRegistry` (never the global one), so two
trainers in one process, or a test, never see each other's series. Every series carries the labels
``rank``, ``node`` and ``run``; a straggler or a dead rank therefore shows up as one rank's series of
one run.

What is exported (all names start with ``pfc_``, values are in base units: seconds, bytes, ratios,
radians, degrees Celsius); :data:`METRIC_NAMES` lists them and ``deploy/`` may query nothing else:

* progress: ``pfc_steps_total``, ``pfc_samples_total`` (this rank's images), ``pfc_training_step``,
  ``pfc_last_step_timestamp_seconds`` (hang detection), ``pfc_world_size``,
  ``pfc_run_end_timestamp_seconds`` (set by :meth:`~TrainingMetrics.close`: this rank's training ended);
* step time: ``pfc_step_duration_seconds`` (histogram of wall time between two steps, evaluation and
  checkpoint time excluded), ``pfc_step_last_duration_seconds`` and
  ``pfc_step_phase_seconds_total{phase=data|forward|backward|communication|optimizer}``
  (communication is the backbone's gradient all-reduce, which overlaps backward; under DeepSpeed, whose
  reductions are not timed, that series does not exist: :func:`~launcher.monitoring.series.measured_phases`);
* optimisation: ``pfc_loss{component=total|softmax|discface}``, ``pfc_learning_rate``,
  ``pfc_grad_norm``, ``pfc_step_finite``, ``pfc_nonfinite_steps_total{cause=loss|gradient}``,
  ``pfc_data_skipped_records_total``, ``pfc_head_sampled_classes``, ``pfc_discface_xi_norm``;
* DiscFace: ``pfc_discrepancy_directional_radians``, ``pfc_discrepancy_directional_circular_variance``,
  ``pfc_discrepancy_radial_std``, ``pfc_discrepancy_radial_cv``, ``pfc_discrepancy_eps_norm_mean``,
  ``pfc_discrepancy_xi_angle_radians`` (this rank's owned classes of the last step);
* evaluation and checkpoints: ``pfc_verification_accuracy{dataset}``,
  ``pfc_verification_accuracy_std{dataset}``, ``pfc_verification_tar{dataset,far}``,
  ``pfc_last_eval_timestamp_seconds``, ``pfc_checkpoint_duration_seconds``, ``pfc_checkpoints_total``
  (the verification results are all-gathered, so every rank exports the same values);
* memory, read at scrape time: ``pfc_memory_rss_bytes``; on GPUs also ``pfc_cuda_memory_allocated_bytes``,
  ``pfc_cuda_memory_reserved_bytes``, ``pfc_cuda_memory_max_allocated_bytes`` and, when
  ``nvidia-ml-py`` is installed, ``pfc_gpu_utilization_ratio``, ``pfc_gpu_memory_used_bytes``,
  ``pfc_gpu_memory_total_bytes``, ``pfc_gpu_temperature_celsius`` (label ``gpu`` = the device UUID).
  On CPUs the GPU series are absent, not zero.

Every series also carries ``run``, the run identity (:func:`resolve_run_id`), so that alerts and panels
aggregate per run: two jobs behind one scrape job, or a new run after an old one, never mix.

Settings (``metrics`` section of the config): ``host`` and ``port_base`` (rank k serves
``port_base + local_rank``); ``port_policy`` ``fail`` (default: a taken port is an error naming
``host:port``) or ``next-free`` (try ``port + k * LOCAL_WORLD_SIZE`` for k = 1..15, never another local
rank's first choice, and log the port taken); ``pushgateway`` (``http://host:9091``: push this rank's
registry under job ``job``, grouped by ``run``, ``node`` and ``rank``, for jobs too short to be scraped:
once right after :meth:`start`, then every ``push_interval_s`` seconds, and a last time from :meth:`close`
with the final values and ``pfc_run_end_timestamp_seconds``, which tells the alerts (``PfcStepHung``,
``PfcThroughputDrop``) and the dashboard that the rank ended rather than hangs. The group is kept: a
Pushgateway never forgets, deleting groups is the operator's call (deploy/prometheus/README.md). Push
errors are logged, never raised).

Where it lives: the names, buckets and labels in :mod:`launcher.monitoring.series`; what is read at scrape
time (memory, GPU) in :mod:`launcher.monitoring.scrape`; here, the families of one rank, serving, pushing
and the trainer's ``observe_*`` calls.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    push_to_gateway,
    start_http_server,
)

from launcher.config import MetricsConfig
from launcher.monitoring.scrape import (
    CudaReading,
    DeviceReading,
    ScrapeTimeCollector,
    default_device_reading,
    rss_bytes,
)
from launcher.monitoring.series import (
    DISCREPANCY,
    LOSSES,
    METRIC_NAMES,
    STEP_BUCKETS,
    measured_phases,
    verification_figures,
)

__all__ = ["METRIC_NAMES", "CudaReading", "DeviceReading", "MetricsPortError", "TrainingMetrics",
           "kept_run_id", "resolve_run_id", "rss_bytes"]

log = logging.getLogger("pfc")

PUSH_TIMEOUT_S = 5.0  # per socket operation of one push
PUSH_JOIN_S = 10.0  # how long close() waits for the push thread before its last push


def resolve_run_id(cfg: MetricsConfig, run_dir: str | os.PathLike[str] | None = None,
                   write: bool = False) -> str:
    """The run identity, the same on every rank of one launch: ``metrics.run_id``, else ``slurm-<job id>``,
    else ``PFC_RUN_ID`` (deploy/k8s sets it to the PyTorchJob's name), else torchrun's rendezvous id
    (``TORCHELASTIC_RUN_ID``; under ``--standalone`` a fresh id per launch), else an id derived from the
    rendezvous address (``MASTER_ADDR:MASTER_PORT``) and ``run_dir``, else a random one. With ``write``
    (rank 0) it is written to ``<run_dir>/run_id``."""
    env = os.environ
    run = cfg.run_id
    if not run and env.get("SLURM_JOB_ID"):
        run = f"slurm-{env['SLURM_JOB_ID']}"
    if not run and env.get("PFC_RUN_ID"):
        run = env["PFC_RUN_ID"]
    if not run and env.get("TORCHELASTIC_RUN_ID") not in (None, "", "none"):
        run = env["TORCHELASTIC_RUN_ID"]
    if not run and env.get("MASTER_PORT"):
        key = f"{env.get('MASTER_ADDR')}:{env['MASTER_PORT']}:{run_dir}"
        run = hashlib.sha1(key.encode()).hexdigest()[:12]
    if not run:
        run = uuid.uuid4().hex[:12]
    if write and run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "run_id").write_text(run + "\n")
    return run


def kept_run_id(run_dir: str | os.PathLike[str]) -> str | None:
    """The run id a previous launch wrote to ``<run_dir>/run_id`` (None: none, or not an id: the file is
    read from disk, so what is kept must be a label value, not any text)."""
    try:
        text = (Path(run_dir) / "run_id").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    try:  # the config's own rule for metrics.run_id, so the two cannot drift apart
        MetricsConfig(run_id=text)
    except ValueError:  # pydantic's ValidationError is a ValueError
        return None
    return text


class MetricsPortError(RuntimeError):
    """The metrics endpoint could not be bound (port taken, address not local, ...)."""



class TrainingMetrics:
    """One rank's exporter. The trainer calls every method on every rank; all are cheap (no I/O).

    With ``cfg.enabled`` false every method is a no-op. ``device`` replaces the GPU probe (tests);
    by default it is the current CUDA device when CUDA is initialised, and nothing on CPUs. ``comm_timed``:
    whether the run's engine times its gradient reductions, which decides the step phases exported
    (:func:`measured_phases`).
    """

    def __init__(self, cfg: MetricsConfig, *, rank: int, local_rank: int, node: int, world_size: int,
                 device: DeviceReading | None = None, run: str | None = None, comm_timed: bool = True) -> None:
        self.cfg = cfg
        self.rank, self.local_rank, self.node, self.world_size = rank, local_rank, node, world_size
        self.enabled = bool(cfg.enabled)
        self.registry = CollectorRegistry(auto_describe=True)
        self.port: int | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._push_stop = threading.Event()
        self._push_thread: threading.Thread | None = None
        # one push at a time: close()'s last push (with the end mark) must reach the gateway after any push the
        # thread has in flight, or an older push applied last would take the end mark away
        self._push_lock = threading.Lock()
        self._gateway: str | None = None
        self._closed = False
        self._last_mark = time.perf_counter()
        self._skipped_records = 0
        self._phases = measured_phases(comm_timed)
        self.run = ""
        if not self.enabled:
            return
        self.run = run if run is not None else resolve_run_id(cfg)
        labels = {"rank": str(rank), "node": str(node), "run": self.run}
        names = list(labels)
        reg = self.registry

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, [*names, *extra], registry=reg)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, [*names, *extra], registry=reg)

        self._labels = labels
        gauge("pfc_world_size", "Number of ranks in the job").labels(**labels).set(world_size)
        self.steps = counter("pfc_steps_total", "Optimizer steps processed, skipped ones included").labels(**labels)
        self.samples = counter("pfc_samples_total", "Images processed by this rank").labels(**labels)
        # Gauges get their series on first set, so nothing reads 0 before it was measured.
        self.step_no = gauge("pfc_training_step", "Index of the last completed step")
        self.last_ts = gauge("pfc_last_step_timestamp_seconds",
                             "Unix time the last step completed (a stale value means a hang)")
        self.step_hist = Histogram("pfc_step_duration_seconds",
                                   "Wall time of one step, evaluation and checkpointing excluded", names,
                                   buckets=STEP_BUCKETS, registry=reg).labels(**labels)
        self.step_last = gauge("pfc_step_last_duration_seconds", "Wall time of the last step")
        self.phase = counter("pfc_step_phase_seconds_total",
                             "Seconds spent per step phase (communication overlaps backward)", ("phase",))
        for phase in self._phases.values():  # a counter born at 0 lets rate()/increase() see its first change
            self.phase.labels(**labels, phase=phase)
        self.loss = gauge("pfc_loss", "Loss of the last step (global batch: Partial FC's softmax spans all ranks)",
                          ("component",))
        self.lr = gauge("pfc_learning_rate", "Backbone learning rate")
        self.grad_norm = gauge("pfc_grad_norm", "Backbone gradient L2 norm before clipping")
        self.finite = gauge("pfc_step_finite", "1 when the last step's loss and gradients were finite on every rank")
        self.nonfinite = counter("pfc_nonfinite_steps_total",
                                 "Steps skipped because the loss or a gradient was non-finite on some rank",
                                 ("cause",))
        for cause in ("loss", "gradient"):
            self.nonfinite.labels(**labels, cause=cause)
        self.skipped_records = counter("pfc_data_skipped_records_total",
                                       "Corrupt training records skipped by this rank's loader").labels(**labels)
        self.sampled = gauge("pfc_head_sampled_classes",
                             "Class centres this rank's Partial FC shard sampled in the last step")
        self.xi_norm = gauge("pfc_discface_xi_norm", "L2 norm of DiscFace's learnable basis xi")
        self.disc = {k: gauge(name, doc) for k, (name, doc, _) in DISCREPANCY.items()}
        self.acc = gauge("pfc_verification_accuracy", "Verification accuracy (10-fold mean)", ("dataset",))
        self.acc_std = gauge("pfc_verification_accuracy_std", "Verification accuracy's std over folds",
                             ("dataset",))
        self.tar = gauge("pfc_verification_tar", "True accept rate at a false accept rate", ("dataset", "far"))
        self.eval_ts = gauge("pfc_last_eval_timestamp_seconds", "Unix time of the last evaluation")
        self.ckpt = gauge("pfc_checkpoint_duration_seconds", "Wall time of the last checkpoint save")
        self.ckpts = counter("pfc_checkpoints_total", "Checkpoints saved").labels(**labels)
        self.ended = gauge("pfc_run_end_timestamp_seconds",
                           "Unix time this rank's training ended (absent while it runs; a killed rank never sets it)")
        reg.register(ScrapeTimeCollector(labels, device if device is not None else default_device_reading()))

    # -- serving -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Serve ``/metrics`` on ``host:port_base + local_rank`` (and start pushing, if configured)."""
        if not self.enabled or self._server is not None:
            return
        host, port = self.cfg.host, self.cfg.port_base + self.local_rank
        policy = self.cfg.port_policy
        stride = int(os.environ.get("LOCAL_WORLD_SIZE") or self.world_size)
        tries = [port] if policy == "fail" else [port + k * stride for k in range(16)]
        last_err: OSError | None = None
        for p in tries:
            if p > 65535:
                break
            try:
                self._server, self._thread = start_http_server(p, addr=host, registry=self.registry)
            except OSError as e:
                last_err = e
                continue
            self.port = p
            break
        if self._server is None:
            hint = ("set metrics.port_base to a free range or metrics.port_policy=next-free"
                    if policy == "fail" else f"tried {len(tries)} ports with stride {stride}")
            why = (str(last_err) if last_err is not None
                   else f"port {port} is past 65535 (metrics.port_base {self.cfg.port_base} + local rank)")
            raise MetricsPortError(
                f"rank {self.rank} (local rank {self.local_rank}): cannot serve metrics on {host}:{port}: "
                f"{why}; {hint}") from last_err
        if self.port != port:
            log.warning(f"metrics: {host}:{port} is taken, rank {self.rank} serves on {host}:{self.port} instead")
        log.info(f"metrics: rank {self.rank} serves http://{host}:{self.port}/metrics")
        self._last_mark = time.perf_counter()
        gateway = self.cfg.pushgateway
        if gateway:
            self._gateway = gateway
            interval = self.cfg.push_interval_s
            self._push_thread = threading.Thread(target=self._push_loop, args=(gateway, interval),
                                                 name=f"pfc-metrics-push-{self.rank}", daemon=True)
            self._push_thread.start()

    def _push(self, gateway: str) -> None:
        try:
            with self._push_lock:
                push_to_gateway(gateway, job=self.cfg.job, registry=self.registry, grouping_key=self._grouping(),
                                timeout=PUSH_TIMEOUT_S)
        except Exception as e:  # monitoring must never stop training
            log.warning(f"metrics: push to {gateway} failed: {e}")

    def _grouping(self) -> dict[str, str]:
        return {"run": self.run, "node": str(self.node), "rank": str(self.rank)}

    def _push_loop(self, gateway: str, interval: float) -> None:
        # The first push at once: a job shorter than one interval must still reach the gateway, and a
        # relaunch under the same run id replaces (PUT) the group its previous launch left marked as ended.
        self._push(gateway)
        while not self._push_stop.wait(interval):
            self._push(gateway)

    # -- observations ------------------------------------------------------------------------------
    def observe_step(self, step: int, scalars: dict[str, float], *, images: int, sampled_classes: int,
                     skipped_records: int) -> None:
        """After each step: ``images`` this rank consumed, ``skipped_records`` cumulative on this rank."""
        if not self.enabled:
            return
        now = time.perf_counter()
        duration, self._last_mark = now - self._last_mark, now
        lab = self._labels
        self.steps.inc()
        self.samples.inc(images)
        self.step_no.labels(**lab).set(step)
        self.step_hist.observe(duration)
        self.step_last.labels(**lab).set(duration)
        for key, phase in self._phases.items():  # never a phase the engine does not time
            if key in scalars:
                self.phase.labels(**lab, phase=phase).inc(max(float(scalars[key]), 0.0))
        for key, component in LOSSES.items():
            if key in scalars:
                self.loss.labels(**lab, component=component).set(float(scalars[key]))
        for key, g in (("lr", self.lr), ("grad_norm", self.grad_norm), ("xi_norm", self.xi_norm)):
            # the trainer sends xi_norm 0.0 with DiscFace off: absent then, not zero
            if key in scalars and (key != "xi_norm" or "loss_disc" in scalars):
                g.labels(**lab).set(float(scalars[key]))
        # an fp16 loss-scale back-off skips the step but is no fault (launcher.trainer.step.is_loss_scale_backoff)
        finite = bool(scalars.get("finite", 1.0)) or bool(scalars.get("scale_backoff", 0.0))
        self.finite.labels(**lab).set(1.0 if finite else 0.0)
        if not finite:
            cause = "loss" if scalars.get("nonfinite_loss", 0.0) else "gradient"
            self.nonfinite.labels(**lab, cause=cause).inc()
        if skipped_records > self._skipped_records:  # the trainer reports a running total
            self.skipped_records.inc(skipped_records - self._skipped_records)
            self._skipped_records = skipped_records
        self.sampled.labels(**lab).set(sampled_classes)
        self.last_ts.labels(**lab).set_to_current_time()

    def observe_discrepancy(self, stats: dict[str, float]) -> None:
        """DiscFace discrepancy statistics of this rank's owned classes (degrees converted to radians)."""
        if not self.enabled:
            return
        for key, value in stats.items():
            if key in self.disc:
                self.disc[key].labels(**self._labels).set(float(value) * DISCREPANCY[key][2])
        self._last_mark = time.perf_counter()

    def observe_eval(self, results: dict[str, dict[str, Any]]) -> None:
        """Verification results per ``.bin`` file name; the label ``dataset`` is the file's stem."""
        if not self.enabled:
            return
        lab = self._labels
        for name, figure, far, value in verification_figures(results):
            dataset = name[:-4] if name.endswith(".bin") else name
            if far is not None:
                self.tar.labels(**lab, dataset=dataset, far=far).set(value)
            else:
                (self.acc if figure == "accuracy" else self.acc_std).labels(**lab, dataset=dataset).set(value)
        self.eval_ts.labels(**lab).set_to_current_time()
        self._last_mark = time.perf_counter()  # evaluation time is not step time

    def not_step_time(self) -> None:
        """The time since the last step ended was no step's (an evaluation, a save, a failed save): the next
        step's duration starts now."""
        self._last_mark = time.perf_counter()

    def observe_checkpoint(self, seconds: float) -> None:
        if not self.enabled:
            return
        self.ckpt.labels(**self._labels).set(seconds)
        self.ckpts.inc()
        self._last_mark = time.perf_counter()  # checkpoint time is not step time

    def close(self) -> None:
        """Mark this rank's training as ended (``pfc_run_end_timestamp_seconds``), push its final values a
        last time when a Pushgateway is set, and stop serving (the port is free again). The group stays in
        the gateway with the end mark, which keeps ``PfcStepHung`` and ``PfcThroughputDrop`` quiet for it."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self._push_thread is not None:
            self._push_stop.set()
            self._push_thread.join(timeout=PUSH_JOIN_S)
            self._push_thread = None
        self.ended.labels(**self._labels).set_to_current_time()
        if self._gateway:
            self._push(self._gateway)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = self._thread = None
