"""`pfc bench discface`: the same training with DiscFace off (lambda = 0) and on, everything else equal.

Both runs use the same synthetic identities, seeds, schedule and world size; each is evaluated on
verification pairs of identities never seen in training (accuracy, TAR@FAR) and on a labelled set of
further unseen identities for DiscFace's two discrepancies (directional: how far the displacements
of one identity point in different directions; radial: the spread of their lengths). The
training-time discrepancies of the owned samples (last logged window) are reported too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from data_pipeline.atomic import atomic_write
from launcher.config import load_config, resolve_config_path
from launcher.distributed import DistContext, torchrun
from launcher.trainer.checkpoint_files import CheckpointPaths

# A fixed offset for the held-out identities' seed, so they share no template with training or val.
_HELDOUT_SEED_OFFSET = 7919


def _last_train_discrepancy(metrics: Path) -> dict[str, float]:
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    keep = [r for r in rows if "discrepancy_directional_deg" in r]
    if not keep:
        return {}
    last = keep[-1]
    return {k[len("discrepancy_"):]: v for k, v in last.items() if k.startswith("discrepancy_")}


def train_and_verify(recipe: Path, sets: list[str], run_sets: list[str], steps: int | None, nproc: int,
                     run: Path, val_bin: Path, what: str) -> tuple[Any, Any, dict[str, Any]]:
    """One study run: train ``recipe`` with ``run_sets`` (``steps`` overriding train.steps, the recipe's
    warm-up fitted into it unless ``sets`` sets one), then verify its latest checkpoint on ``val_bin``.
    Returns (config, backbone, verification of ``val_bin``); ``what`` names the run in an error."""
    from launcher.trainer.evaluation import evaluate_bins
    from partialfc.backbones import load_backbone

    run_sets = list(run_sets)
    if steps is not None:
        run_sets.append(f"train.steps={steps}")
        if all(not x.startswith("optim.warmup_steps=") for x in sets):  # fit the recipe's warm-up in
            run_sets.append(f"optim.warmup_steps={min(load_config(recipe, sets).optim.warmup_steps, steps)}")
    code = torchrun(["train", str(recipe), *[a for s in run_sets for a in ("--set", s)]], nproc)
    if code:
        raise RuntimeError(f"training {what} failed (exit code {code}); see {run}")
    cfg = load_config(recipe, run_sets)
    latest = CheckpointPaths(run / "checkpoints").latest()
    assert latest is not None
    model = load_backbone(latest / "backbone.safetensors")
    ver = evaluate_bins(model, [str(val_bin)], cfg, DistContext.single_process(), roc_dir=run)[val_bin.name]
    return cfg, model, ver


def discface_study(out: Path, *, config: str, lambdas: list[float], identities: int, images_per_identity: int,
                   heldout_identities: int, steps: int | None, nproc: int, sets: list[str],
                   hard: bool = False) -> dict[str, Any]:
    from data_pipeline.synth import default_val_bin, generate
    from launcher.trainer.evaluation import heldout_discrepancy_of

    recipe = resolve_config_path(config)
    base = load_config(recipe, sets)
    size, seed = base.model.image_size, base.train.seed
    prefix, heldout = out / "data" / "train", out / "data" / "heldout"
    val_bin = default_val_bin(prefix)
    from data_pipeline.synth import HARD_JITTER

    jitter: dict[str, Any] = {"jitter": HARD_JITTER} if hard else {}
    if not (prefix.with_suffix(".rec").is_file() and val_bin.is_file()):
        generate(prefix, identities, images_per_identity, image_size=size,
                 val_identities=max(100, identities // 3), val_pairs=6000, seed=seed, **jitter)
    if not heldout.with_suffix(".rec").is_file():
        generate(heldout, heldout_identities, images_per_identity, image_size=size, val_identities=0,
                 seed=seed + _HELDOUT_SEED_OFFSET, **jitter)
    results: dict[str, Any] = {"config": str(recipe), "identities": identities, "hard_jitter": hard,
                               "images_per_identity": images_per_identity, "world_size": nproc, "runs": {}}
    for lam in lambdas:
        run = out / f"lambda_{lam:g}"
        run_sets = [*sets, f"data.prefix={json.dumps(str(prefix))}", f"data.val_bins={json.dumps([str(val_bin)])}",
                    f"output={json.dumps(str(run))}", f"head.discface_lambda={lam}"]
        cfg, model, ver = train_and_verify(recipe, sets, run_sets, steps, nproc, run, val_bin,
                                           f"with discface_lambda={lam}")
        disc = heldout_discrepancy_of(model, heldout, size, cfg.eval.batch_size, torch.device("cpu"))
        results["runs"][f"{lam:g}"] = {
            "discface_lambda": lam, "accuracy": ver["accuracy"], "accuracy_std": ver["accuracy_std"],
            "tar_at_far": ver["tar_at_far"], "auc": ver["auc"], "heldout_discrepancy": disc,
            "train_discrepancy": _last_train_discrepancy(run / "metrics.jsonl"),
            "final_loss": json.loads((run / "summary.json").read_text())["final"].get("loss"),
        }
    atomic_write(out / "discface_study.json", json.dumps(results, indent=2, default=float))
    return results


def format_study(results: dict[str, Any]) -> str:
    def f(v: Any, spec: str = ".4f") -> str:
        return "n/a" if v is None or v != v else format(float(v), spec)

    lines = [f"{'lambda':>7s} {'accuracy':>16s} {'TAR@1e-3':>9s} {'TAR@1e-2':>9s} {'AUC':>7s} "
             f"{'dir(deg)':>9s} {'radial cv':>9s} {'train dir':>9s} {'train cv':>9s}"]
    for key, r in results["runs"].items():
        h, t = r["heldout_discrepancy"], r["train_discrepancy"]
        lines.append(f"{key:>7s} {f(r['accuracy'])} ± {f(r['accuracy_std'])} {f(r['tar_at_far'].get('1e-3')):>9s} "
                     f"{f(r['tar_at_far'].get('1e-2')):>9s} {f(r['auc']):>7s} {f(h.get('directional_deg'), '.2f'):>9s} "
                     f"{f(h.get('radial_cv')):>9s} {f(t.get('directional_deg'), '.2f'):>9s} "
                     f"{f(t.get('radial_cv')):>9s}")
    return "\n".join(lines)
