"""`pfc demo`: the built-in end-to-end job on a fresh machine.

Synthetic identities (``data_pipeline.synth``) -> ``pfc train demo_cpu`` on N ranks under torchrun, on the
CPU or, where CUDA is visible, on the GPU(s) as the trainer picks (Partial FC with r < 1, CosFace, DiscFace
on) -> evaluation of the final checkpoint on unseen identities, compared with the same network untrained
-> a report folder: config, metrics JSON, loss-curve and ROC PNGs, the final checkpoint.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from data_pipeline.atomic import atomic_write
from launcher import strict_json
from launcher.bench.study_runs import fitted_schedule, fmt
from launcher.config import build_overrides, builtin_config, load_config
from launcher.distributed import DistContext, torchrun
from launcher.monitoring.plots import plot_losses

log = logging.getLogger("pfc")


def ranks_device() -> str:
    """The device the demo's ranks will train on, as the log line names it: ``CUDA`` wherever CUDA is visible
    (the trainer's rule, :func:`launcher.distributed.init_distributed`; torchrun's ranks see this process's
    devices, and the recipe's gloo backend does not keep them off the GPU), else ``CPU``."""
    return "CUDA" if torch.cuda.is_available() else "CPU"


def run_demo(out: Path, *, identities: int, images_per_identity: int, steps: int | None, nproc: int,
             extra_sets: list[str]) -> int:
    from data_pipeline.synth import HARD_JITTER, default_val_bin, generate
    from launcher.trainer.evaluation import evaluate_bins
    from launcher.trainer.progress import setup_logging
    from partialfc.backbones import get_backbone

    setup_logging(0)
    out = out.resolve()
    recipe = builtin_config("demo_cpu")
    base = load_config(recipe, extra_sets)
    prefix = out / "data" / "train"
    val_bin = default_val_bin(prefix)
    if not (prefix.with_suffix(".rec").is_file() and val_bin.is_file()):
        t0 = time.perf_counter()
        # Strong nuisance and 3,000 pairs (1,500 impostors), so accuracy and TAR@FAR=1e-3 both say something.
        rep = generate(prefix, identities, images_per_identity, image_size=base.model.image_size,
                       val_identities=max(50, identities // 3), val_pairs=3000, seed=base.train.seed,
                       jitter=HARD_JITTER)
        log.info(f"synthetic data: {rep.identities} identities x {images_per_identity} images "
                 f"({rep.image_size}px) + {rep.val_pairs} verification pairs in {time.perf_counter() - t0:.1f}s")
    sets = build_overrides(str(prefix), [str(val_bin)], str(out), None)
    if steps is not None:
        sets.append(f"train.steps={steps}")
        # a short demo may be shorter than the recipe's warm-up or freeze (refused by the config otherwise)
        sets += fitted_schedule(base, steps)
    sets += extra_sets
    cfg = load_config(recipe, sets)

    # The same network untrained, for comparison: what training bought.
    torch.manual_seed(cfg.train.seed)
    untrained = get_backbone(cfg.model.backbone, embedding_size=cfg.model.embedding_size,
                             image_size=cfg.model.image_size, width=cfg.model.width)
    before = evaluate_bins(untrained, [str(val_bin)], cfg, DistContext.single_process())

    command = "pfc train demo_cpu " + " ".join(f"--set {s}" for s in sets)
    log.info(f"training on {nproc} {ranks_device()} rank(s): {command}")
    code = torchrun(["train", "demo_cpu", *[a for s in sets for a in ("--set", s)]], nproc)
    if code:
        log.error(f"training failed with exit code {code}")
        return code

    from launcher.trainer.checkpoint_files import CheckpointPaths
    from partialfc.backbones import load_backbone

    latest = CheckpointPaths(out / "checkpoints").latest()
    if latest is None:
        log.error(f"training ended without a checkpoint in {out / 'checkpoints'}")
        return 1
    model = load_backbone(latest / "backbone.safetensors")
    after = evaluate_bins(model, [str(val_bin)], cfg, DistContext.single_process(), roc_dir=out)
    loss_png = plot_losses(out / "metrics.jsonl", out / "loss.png")
    report: dict[str, Any] = {"checkpoint": str(latest), "untrained": before, "trained": after,
                              "loss_curve": str(loss_png) if loss_png else None}
    atomic_write(out / "eval.json", strict_json.dumps(report, indent=2))
    name = val_bin.name
    print(f"\nverification on {cfg.data.val_bins[0]} (identities never seen in training):")
    print(f"{'':12s} {'accuracy':>10s} {'TAR@FAR=1e-3':>14s} {'TAR@FAR=1e-2':>14s}")
    for label, res in (("untrained", before[name]), ("trained", after[name])):
        tar = res["tar_at_far"]
        print(f"{label:12s} {res['accuracy']:10.4f} {fmt(tar.get('1e-3')):>14s} {fmt(tar.get('1e-2')):>14s}")
    print(f"\nreport folder: {out}  (config.yaml, metrics.jsonl, eval.json, loss.png, roc_*.png, checkpoints/)")
    return 0
