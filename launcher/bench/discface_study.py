"""`pfc bench discface`: the same training with DiscFace off (lambda = 0) and on, everything else equal.

Both runs use the same synthetic identities, seeds, schedule and world size; each is evaluated on
verification pairs of identities never seen in training (accuracy, TAR@FAR) and on a labelled set of
further unseen identities for DiscFace's two discrepancies (directional: how far the displacements
of one identity point in different directions; radial: the spread of their lengths). The
training-time discrepancies of the owned samples (last logged window) are reported too. The runs
themselves are :func:`launcher.bench.study_runs.train_and_verify`'s, as `pfc bench augment`'s are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from launcher.bench.study_runs import fmt, generate_once, metrics_rows, study_sets, train_and_verify, write_study
from launcher.config import load_config, resolve_config_path

# A fixed offset for the held-out identities' seed, so they share no template with training or val.
_HELDOUT_SEED_OFFSET = 7919
# The verification set: VAL_PAIRS pairs of at least VAL_MIN_IDENTITIES unseen identities (a third of the
# training count if more). Module-level so that the end-to-end test can shrink them: decoding and embedding
# 12000 images in each run and again in the study's own verification was most of that test's time.
VAL_MIN_IDENTITIES = 100
VAL_PAIRS = 6000


def _last_train_discrepancy(run: Path, window: int = 20) -> dict[str, float]:
    """The training discrepancies, without their ``discrepancy_`` prefix: the mean of the last ``window``
    measurements the log holds. ``metrics.jsonl`` carries the last measured value on every row, so only the
    rows of the steps that measured (``eval.discrepancy_every_steps``) count; one measurement alone is
    noisy (a standard deviation of about 2 degrees between neighbours in a demo run)."""
    every = load_config(run / "config.yaml").eval.discrepancy_every_steps
    rows = [r for r in metrics_rows(run) if "discrepancy_directional_deg" in r and r["step"] % every == 0]
    measured = list({r["step"]: r for r in rows}.values())[-window:]  # a step logged twice: its last row
    if not measured:
        return {}
    keys = [k for k in measured[-1] if k.startswith("discrepancy_")]
    return {k[len("discrepancy_"):]: sum(float(r[k]) for r in measured) / len(measured) for k in keys}


def discface_study(out: Path, *, config: str, lambdas: list[float], identities: int, images_per_identity: int,
                   heldout_identities: int, steps: int | None, nproc: int, sets: list[str],
                   hard: bool = False) -> dict[str, Any]:
    """Train ``config`` (+ ``sets``) once per DiscFace lambda; verify each on unseen identities and
    measure its discrepancies on a held-out set. Writes ``out/discface_study.json``, returns the same."""
    from data_pipeline.synth import HARD_JITTER, default_val_bin
    from launcher.trainer.evaluation import heldout_discrepancy_of

    recipe = resolve_config_path(config)
    base = load_config(recipe, sets)
    size, seed = base.model.image_size, base.train.seed
    prefix, heldout = out / "data" / "train", out / "data" / "heldout"
    val_bin = default_val_bin(prefix)
    jitter: dict[str, Any] = {"jitter": HARD_JITTER} if hard else {}
    generate_once(prefix, identities, images_per_identity, needs_val_bin=True, image_size=size,
                  val_identities=max(VAL_MIN_IDENTITIES, identities // 3), val_pairs=VAL_PAIRS, seed=seed, **jitter)
    generate_once(heldout, heldout_identities, images_per_identity, needs_val_bin=False, image_size=size,
                  val_identities=0, seed=seed + _HELDOUT_SEED_OFFSET, **jitter)
    results: dict[str, Any] = {"config": str(recipe), "identities": identities, "hard_jitter": hard,
                               "images_per_identity": images_per_identity, "world_size": nproc, "runs": {}}
    for lam in lambdas:
        run = out / f"lambda_{lam:g}"
        r = train_and_verify(recipe, sets, study_sets(sets, prefix, val_bin, run, f"head.discface_lambda={lam}"),
                             steps, nproc, run, val_bin, f"with discface_lambda={lam}")
        disc = heldout_discrepancy_of(r.model, heldout, size, r.cfg.eval.batch_size, torch.device("cpu"))
        results["runs"][f"{lam:g}"] = {
            "discface_lambda": lam, **r.scores(), "heldout_discrepancy": disc,
            "train_discrepancy": _last_train_discrepancy(run), "final_loss": r.final_loss(),
        }
    write_study(out / "discface_study.json", results)
    return results


def format_study(results: dict[str, Any]) -> str:
    """The table printed by `pfc bench discface`: which synthetic nuisance the study drew (``--hard``), then
    one row per lambda."""
    nuisance = "hard (--hard: pose, light, noise)" if results["hard_jitter"] else "default (no --hard)"
    lines = [f"synthetic nuisance: {nuisance}",
             f"{'lambda':>7s} {'accuracy':>16s} {'TAR@1e-3':>9s} {'TAR@1e-2':>9s} {'AUC':>7s} "
             f"{'dir(deg)':>9s} {'radial cv':>9s} {'train dir':>9s} {'train cv':>9s}"]
    for key, r in results["runs"].items():
        h, t = r["heldout_discrepancy"], r["train_discrepancy"]
        lines.append(f"{key:>7s} {fmt(r['accuracy'])} ± {fmt(r['accuracy_std'])} "
                     f"{fmt(r['tar_at_far'].get('1e-3')):>9s} {fmt(r['tar_at_far'].get('1e-2')):>9s} "
                     f"{fmt(r['auc']):>7s} {fmt(h.get('directional_deg'), '.2f'):>9s} "
                     f"{fmt(h.get('radial_cv')):>9s} {fmt(t.get('directional_deg'), '.2f'):>9s} "
                     f"{fmt(t.get('radial_cv')):>9s}")
    return "\n".join(lines)
