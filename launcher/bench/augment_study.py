"""`pfc bench augment`: the same training without and with ``data.augment``, same data and seeds.

Few synthetic identities with strong nuisance (``HARD_JITTER``: pose, light, noise), trained long
enough to memorise them; verified on pairs of identities never seen in training. For each training
seed both runs share everything but the augmentation (the flip stays as configured in both). Reported
per run: the final model's verification accuracy with its spread over the 10 folds, TAR@FAR, AUC,
the best accuracy seen during training, and the final training loss. The runs themselves are
:func:`launcher.bench.study_runs.train_and_verify`'s, as `pfc bench discface`'s are.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from launcher.bench.study_runs import fmt, generate_once, metrics_rows, study_sets, train_and_verify, write_study
from launcher.config import load_config, resolve_config_path

#: ``pfc bench augment``'s "on" run and the finetune_small recipe (launcher/configs/finetune_small.yaml)
RECOMMENDED: dict[str, Any] = {
    "crop": {"p": 0.3, "scale": [0.7, 1.0], "ratio": [0.85, 1.18]},
    "shift": {"p": 0.5, "scale": [0.9, 1.1], "max_shift": 0.08},
    "rotation": {"p": 0.5, "degrees": 12.0},
    "color": {"p": 0.8, "brightness": 0.35, "contrast": 0.35, "saturation": 0.3},
    "grayscale": {"p": 0.1},
    "erasing": {"p": 0.25, "area": [0.02, 0.15], "ratio": [0.3, 3.3], "value": 0.0},
}


def recommended_sets() -> list[str]:
    """:data:`RECOMMENDED` as ``--set data.augment.<op>.<field>=value`` overrides."""
    return [f"data.augment.{op}.{k}={json.dumps(v)}" for op, fields in RECOMMENDED.items() for k, v in fields.items()]


def _best_during_training(run: Path, stem: str) -> float | None:
    """The best verification accuracy on ``stem``'s set that the run logged while training."""
    key = f"val_{stem}_accuracy"
    vals = [r[key] for r in metrics_rows(run) if key in r]
    return max(vals) if vals else None


def augment_study(out: Path, *, config: str, seeds: list[int], identities: int, images_per_identity: int,
                  val_identities: int, val_pairs: int, steps: int | None, nproc: int, sets: list[str],
                  augment_sets: list[str] | None = None, hard: bool = True) -> dict[str, Any]:
    """Train ``config`` (+ ``sets``) with augmentation off and on (``augment_sets``, default
    :data:`RECOMMENDED`) for each training seed; evaluate on unseen identities. Writes
    ``out/augment_study.json`` and returns the same dict."""
    from data_pipeline.synth import DEFAULT_JITTER, HARD_JITTER, default_val_bin

    recipe = resolve_config_path(config)
    base = load_config(recipe, sets)
    prefix = out / "data" / "train"
    val_bin = default_val_bin(prefix)
    # one dataset for every run: the seeds vary the training (init, order, flips, augmentation)
    generate_once(prefix, identities, images_per_identity, needs_val_bin=True, image_size=base.model.image_size,
                  val_identities=val_identities, val_pairs=val_pairs, seed=0,
                  jitter=HARD_JITTER if hard else DEFAULT_JITTER)
    on = list(augment_sets) if augment_sets is not None else recommended_sets()
    results: dict[str, Any] = {"config": str(recipe), "sets": sets, "augment_sets": on, "hard_jitter": hard,
                               "identities": identities, "images_per_identity": images_per_identity,
                               "val_identities": val_identities, "val_pairs": val_pairs, "world_size": nproc,
                               "seeds": seeds, "runs": {}}
    for seed in seeds:
        for name, extra in (("off", []), ("on", on)):
            run = out / f"{name}_seed{seed}"
            r = train_and_verify(recipe, sets, study_sets(sets, prefix, val_bin, run, *extra, f"train.seed={seed}"),
                                 steps, nproc, run, val_bin, f"{name} (seed {seed})")
            results["runs"][f"{name}_seed{seed}"] = {
                "augment": name, "seed": seed, **r.scores(),
                "best_accuracy_during_training": _best_during_training(run, val_bin.stem),
                "final_loss": r.final_loss(),
            }
    for name in ("off", "on"):
        accs = [r["accuracy"] for r in results["runs"].values() if r["augment"] == name]
        results[f"mean_accuracy_{name}"] = statistics.fmean(accs)
    write_study(out / "augment_study.json", results)
    return results


def format_augment_study(results: dict[str, Any]) -> str:
    """The table printed by `pfc bench augment`: one row per run, then the mean accuracy off and on."""
    lines = [f"{'run':>10s} {'accuracy ± fold std':>20s} {'TAR@1e-2':>9s} {'AUC':>7s} {'best seen':>9s} "
             f"{'final loss':>10s}"]
    for key, r in results["runs"].items():
        lines.append(f"{key:>10s} {fmt(r['accuracy']):>11s} ± {fmt(r['accuracy_std'])} "
                     f"{fmt(r['tar_at_far'].get('1e-2')):>9s} {fmt(r['auc']):>7s} "
                     f"{fmt(r['best_accuracy_during_training']):>9s} {fmt(r['final_loss'], '.3g'):>10s}")
    lines.append(f"mean accuracy over seeds {results['seeds']}: off {fmt(results['mean_accuracy_off'])}, "
                 f"on {fmt(results['mean_accuracy_on'])}")
    return "\n".join(lines)
