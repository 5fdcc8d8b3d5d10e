"""The exporter's metric definitions: histogram buckets, which trainer scalar feeds which series and
label, and :data:`METRIC_NAMES`, every family the exporter can emit (``deploy/`` may query nothing else);
:func:`measured_phases`, which step phases a run's engine times; :func:`verification_figures`, how the
exporter and the trackers read an evaluation's results.
The families themselves are created per rank by :class:`launcher.monitoring.exporter.TrainingMetrics`."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

# Wall time of one step spans milliseconds (tiny CPU runs) to minutes (huge heads, slow storage).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# trainer scalar -> step phase label
PHASES = {"time_data_s": "data", "time_forward_s": "forward", "time_backward_s": "backward",
           "time_comm_s": "communication", "time_optimizer_s": "optimizer"}


def measured_phases(comm_timed: bool) -> dict[str, str]:
    """The step phases (trainer scalar -> phase label, as :data:`PHASES`) a run times: all of them, less
    ``communication`` when its engine does not time its gradient reductions (``comm_timed`` false: the
    engine has no comm timer, as DeepSpeed, whose reductions run inside its engine). A phase left out has no
    series at all: absent, not a 0 that would read as "no communication"."""
    if not comm_timed:
        return {k: v for k, v in PHASES.items() if k != "time_comm_s"}
    return dict(PHASES)


# trainer scalar -> loss component label
LOSSES = {"loss": "total", "loss_softmax": "softmax", "loss_disc": "discface"}
# discrepancy key -> (metric name, help, factor to base units)
DISCREPANCY = {
    "discrepancy_directional_deg": ("pfc_discrepancy_directional_radians",
                                    "Mean angle between a sample's displacement and its class's mean "
                                    "displacement (this rank's owned classes, last measured step)",
                                    math.pi / 180.0),
    "discrepancy_directional_circvar": ("pfc_discrepancy_directional_circular_variance",
                                        "1 - mean resultant length of the unit displacements per class", 1.0),
    "discrepancy_radial_std": ("pfc_discrepancy_radial_std",
                               "Standard deviation of displacement norms within a class", 1.0),
    "discrepancy_radial_cv": ("pfc_discrepancy_radial_cv",
                              "Coefficient of variation of displacement norms within a class", 1.0),
    "discrepancy_eps_norm_mean": ("pfc_discrepancy_eps_norm_mean", "Mean norm of the displacements", 1.0),
    "discrepancy_xi_angle_deg": ("pfc_discrepancy_xi_angle_radians",
                                 "Mean angle between displacements and the learnable basis xi", math.pi / 180.0),
}

GPU_METRICS = ("pfc_cuda_memory_allocated_bytes", "pfc_cuda_memory_reserved_bytes",
                "pfc_cuda_memory_max_allocated_bytes", "pfc_gpu_utilization_ratio", "pfc_gpu_memory_used_bytes",
                "pfc_gpu_memory_total_bytes", "pfc_gpu_temperature_celsius")

#: Every metric family the exporter can emit (GPU ones only on GPUs). Counters and histograms appear
#: in the exposition with their suffixes (``_total``, ``_bucket``/``_sum``/``_count``, ``_created``).
METRIC_NAMES: tuple[str, ...] = (
    "pfc_world_size", "pfc_steps_total", "pfc_samples_total", "pfc_training_step",
    "pfc_last_step_timestamp_seconds", "pfc_run_end_timestamp_seconds", "pfc_step_duration_seconds",
    "pfc_step_last_duration_seconds",
    "pfc_step_phase_seconds_total", "pfc_loss", "pfc_learning_rate", "pfc_grad_norm", "pfc_step_finite",
    "pfc_nonfinite_steps_total", "pfc_data_skipped_records_total", "pfc_head_sampled_classes",
    "pfc_discface_xi_norm", *(v[0] for v in DISCREPANCY.values()), "pfc_verification_accuracy",
    "pfc_verification_accuracy_std", "pfc_verification_tar", "pfc_last_eval_timestamp_seconds",
    "pfc_checkpoint_duration_seconds", "pfc_checkpoints_total", "pfc_memory_rss_bytes", *GPU_METRICS,
)


def verification_figures(results: dict[str, dict[str, Any]]) -> Iterator[tuple[str, str, str | None, float]]:
    """Each measured figure of verification results (``launcher.trainer.evaluation.evaluate_bins``, keyed by
    ``.bin`` name): ``(name, "accuracy" | "accuracy_std" | "tar", far or None, value)``. A TAR of None (too
    few negative pairs to reach that FAR) or a missing std is left out: absent, not zero."""
    for name, r in results.items():
        for key in ("accuracy", "accuracy_std"):
            if r.get(key) is not None:
                yield name, key, None, float(r[key])
        for far, tar in (r.get("tar_at_far") or {}).items():
            if tar is not None:
                yield name, "tar", str(far), float(tar)
