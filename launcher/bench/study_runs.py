"""The training runs the benchmarks and studies start, and what they read back from a run folder.

`pfc bench discface` and `pfc bench augment` compare trainings that differ in one setting; each
run is the ordinary trainer under torchrun (:func:`run_training`) on a synthetic dataset made once
per study (:func:`generate_once`), then its latest checkpoint is verified in this process
(:func:`train_and_verify`). `pfc bench train` starts its timed run the same way. A run folder
holds ``metrics.jsonl`` (one JSON object per logged step, rank 0) and ``summary.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_pipeline.atomic import atomic_write
from launcher import strict_json
from launcher.config import load_config, set_value
from launcher.distributed import torchrun
from launcher.errors import TrainingRunFailed

if TYPE_CHECKING:
    import torch

    from launcher.config import Config

#: What a study reports of a verification (``launcher.trainer.evaluation.evaluate_bins``'s per-set dict).
SCORES = ("accuracy", "accuracy_std", "tar_at_far", "auc")


def run_training(config: str | Path, run_sets: list[str], nproc: int) -> int:
    """`pfc train CONFIG --set ...` on ``nproc`` ranks (torchrun, this machine); its exit code."""
    return torchrun(["train", str(config), *[a for s in run_sets for a in ("--set", s)]], nproc)


def fitted_schedule(cfg: Config, steps: int) -> list[str]:
    """The ``--set`` s that fit the recipe's warm-up and backbone freeze into a run of ``steps`` steps (the
    config refuses a warm-up longer than the run and a freeze as long as it, and a benchmark or study run
    may be shorter than the recipe's). A freeze that does not fit keeps its share of the recipe's steps."""
    out = [f"optim.warmup_steps={min(cfg.optim.warmup_steps, steps)}"]
    freeze = cfg.train.freeze_backbone_steps
    if freeze >= steps:
        out.append(f"train.freeze_backbone_steps={min(freeze * steps // cfg.train.steps, steps - 1)}")
    return out


def generate_once(prefix: Path, identities: int, images_per_identity: int, *, needs_val_bin: bool,
                  **generate_kw: Any) -> None:
    """Write the synthetic dataset PREFIX (``data_pipeline.synth.generate``) unless it is there, so
    that every run of a study (and a study run again in the same folder) trains on the same files."""
    from data_pipeline.synth import default_val_bin, generate

    if prefix.with_suffix(".rec").is_file() and (not needs_val_bin or default_val_bin(prefix).is_file()):
        return
    generate(prefix, identities, images_per_identity, **generate_kw)


def metrics_rows(run: Path) -> list[dict[str, Any]]:
    """The records of ``run/metrics.jsonl``, in the order they were logged (a null value, not a finite
    number, as NaN)."""
    return [strict_json.nan_for_null(json.loads(x)) for x in (run / "metrics.jsonl").read_text().splitlines()
            if x.strip()]


def study_sets(sets: list[str], prefix: Path, val_bin: Path, run: Path, *extra: str) -> list[str]:
    """The ``--set``s of one study run: the user's ``sets``, the run's own ``extra`` (what differs
    between the runs), then the study's dataset, verification set and run folder."""
    return [*sets, *extra, f"data.prefix={set_value(str(prefix))}", f"data.val_bins={set_value([str(val_bin)])}",
            f"output={set_value(str(run))}"]


@dataclass
class StudyRun:
    """One trained and verified run of a study."""

    cfg: Config
    model: torch.nn.Module       # the backbone of the run's latest checkpoint
    verification: dict[str, Any]  # evaluate_bins' metrics of the study's verification set
    run: Path

    def scores(self) -> dict[str, Any]:
        """Accuracy (and its spread over the 10 folds), TAR@FAR and AUC on the verification set."""
        return {k: self.verification[k] for k in SCORES}

    def final_loss(self) -> float | None:
        """The loss at the run's last step, from ``summary.json`` (None when it was not finite)."""
        loss: float | None = json.loads((self.run / "summary.json").read_text())["final"].get("loss")
        return loss


def train_and_verify(recipe: Path, sets: list[str], run_sets: list[str], steps: int | None, nproc: int,
                     run: Path, val_bin: Path, what: str) -> StudyRun:
    """One study run: train ``recipe`` with ``run_sets`` (``steps`` overriding train.steps, the recipe's
    warm-up fitted into it unless the user's ``sets`` set one), then verify its latest checkpoint on
    ``val_bin`` in this process. ``what`` names the run in an error."""
    from launcher.distributed import DistContext
    from launcher.trainer.checkpoint_files import CheckpointPaths
    from launcher.trainer.evaluation import evaluate_bins
    from partialfc.backbones import load_backbone

    run_sets = list(run_sets)
    if steps is not None:
        run_sets.append(f"train.steps={steps}")
        run_sets += [x for x in fitted_schedule(load_config(recipe, sets), steps)
                     if not any(u.startswith(x.split("=")[0] + "=") for u in sets)]
    code = run_training(recipe, run_sets, nproc)
    if code:
        raise TrainingRunFailed(f"training {what} failed (exit code {code}); see {run}")
    cfg = load_config(recipe, run_sets)
    latest = CheckpointPaths(run / "checkpoints").latest()
    assert latest is not None
    model = load_backbone(latest / "backbone.safetensors")
    ver = evaluate_bins(model, [str(val_bin)], cfg, DistContext.single_process(), roc_dir=run)[val_bin.name]
    return StudyRun(cfg, model, ver, run)


def write_study(path: Path, results: dict[str, Any]) -> None:
    """A study's results as indented JSON, written atomically (NumPy scalars as floats; strict JSON: a
    value that is not a finite number, as the held-out ``xi_angle_deg`` without xi, is null)."""
    atomic_write(path, strict_json.dumps(results, indent=2))


def fmt(value: Any, spec: str = ".4f") -> str:
    """A figure of a study's table; "n/a" for a missing or NaN one."""
    return "n/a" if value is None or value != value else format(float(value), spec)
