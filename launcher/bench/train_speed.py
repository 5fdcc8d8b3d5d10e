"""`pfc bench train`: images/s and the step-time split of a real training run (torchrun, N ranks).

The run is the ordinary trainer on a config (synthetic data when none is given), with checkpoints and
evaluation pushed out of the timed window; per-step figures come from its ``metrics.jsonl``
(``log.every_steps=1``) and the first ``warmup`` steps are dropped. Step time and split are rank 0's
(the collectives of every step make the ranks wait for each other, so in steady state rank 0's step
period is the slowest rank's).

The floor (:func:`backbone_floor`, `pfc bench train --floor`): the backbone's forward + backward
alone, on one rank in this process, on batches made on the device: the part of a training step no
input pipeline, head or optimizer can make faster, so images/s over it says what the rest costs.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from launcher.bench.study_runs import fitted_schedule, generate_once, metrics_rows, run_training
from launcher.config import load_config, resolve_config_path, set_value
from launcher.errors import TrainingRunFailed

SPLIT = ("time_data_s", "time_forward_s", "time_backward_s", "time_comm_s", "time_optimizer_s")


def summarise(rows: list[dict[str, Any]], warmup: int, global_batch: int) -> dict[str, Any]:
    """Median step time (from consecutive log times) and median split over the steps after warm-up;
    ``warmup_steps`` and ``timed_step_range`` (first and last step timed) say which steps those were.

    A phase no timed row carries (``time_comm_s`` under DeepSpeed, whose reductions are not timed) is left
    out of ``split_s`` and ``split_fraction``: absent, not a median of zeros read as "no communication"."""
    rows = sorted((r for r in rows if "loss" in r and "time_forward_s" in r), key=lambda r: r["step"])
    timed = [r for r in rows if r["step"] > warmup]
    if len(timed) < 2:
        raise ValueError(f"need at least 2 logged steps after {warmup} warm-up steps, got {len(timed)}")
    gaps = [b["time"] - a["time"] for a, b in itertools.pairwise(timed) if b["step"] == a["step"] + 1]
    step_s = statistics.median(gaps)
    split = {k: statistics.median(r.get(k, 0.0) for r in timed) for k in SPLIT if any(k in r for r in timed)}
    return {"step_s": step_s, "images_per_s": global_batch / step_s, "split_s": split,
            "split_fraction": {k: v / step_s for k, v in split.items()}, "steps_timed": len(gaps),
            "warmup_steps": warmup, "timed_step_range": [timed[0]["step"], timed[-1]["step"]]}


def backbone_floor(config: str, sets: list[str], steps: int, warmup: int) -> dict[str, Any]:
    """The backbone's forward + backward alone, in this process, on the device the trainer would pick.

    Same backbone, batch per rank, autocast dtype, channels_last, kernel settings (``train.cudnn_benchmark``,
    ``train.deterministic``) and fp16 loss scaling as the run, on
    one batch of uint8 pixels made on the device and normalised as the step does
    (:func:`launcher.trainer.batches.to_model_input`); the loss is a plain sum of the embeddings (no head, no
    optimizer step, no communication). ``images_per_s`` is the floor a whole training step is set
    against; ``peak_memory_bytes`` the CUDA allocator's peak during the timed steps (None on CPU).
    """
    import time

    import torch

    from launcher.bench.gemm_floor import sync
    from launcher.trainer.batches import to_model_input
    from launcher.trainer.components import backbone_config
    from launcher.trainer.kernels import kernel_settings
    from launcher.trainer.step import backbone_autocast

    cfg = load_config(resolve_config_path(config), sets)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    from launcher.distributed import DistContext
    from partialfc.backbones import get_backbone

    ctx = DistContext.single_process(device)
    torch.manual_seed(cfg.train.seed)
    b = backbone_config(cfg)
    net = get_backbone(b["name"], embedding_size=b["embedding_size"], image_size=b["image_size"],
                       width=b["width"], dropout=b["dropout"]).to(device)
    channels_last = cfg.train.channels_last and cuda
    if channels_last:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    net.train()
    scaler = torch.amp.GradScaler("cuda") if cfg.train.amp == "fp16" and cuda else None
    s = cfg.model.image_size
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    pixels = torch.randint(0, 256, (cfg.train.batch_size, s, s, 3), generator=gen, dtype=torch.uint8,
                           device=device)

    def step() -> None:
        x = to_model_input(pixels, device, channels_last)
        with backbone_autocast(cfg, ctx):
            emb = net(x)
        loss = emb.float().sum()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        for p in net.parameters():
            p.grad = None

    with kernel_settings(cfg, device) as kernels:  # the kernels the trainer runs (cuDNN autotuner by default)
        for _ in range(warmup):
            step()
        sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        seconds = (time.perf_counter() - t0) / steps
    peak = int(torch.cuda.max_memory_allocated(device)) if cuda else None
    return {"step_s": seconds, "images_per_s": cfg.train.batch_size / seconds, "peak_memory_bytes": peak,
            "steps_timed": steps, "device": str(device), "amp": cfg.train.amp, "channels_last": channels_last,
            "backbone": cfg.model.backbone, "image_size": s, "batch": cfg.train.batch_size, "kernels": kernels}


def bench_train(config: str, data: str | None, steps: int, warmup: int, nproc: int, sets: list[str],
                workdir: Path | None = None, device_data: bool = False, keep: bool = False) -> dict[str, Any]:
    """Run the trainer for ``warmup + steps`` steps on ``nproc`` ranks and summarise its metrics.

    ``device_data``: batches made on the device (``data.loader=synthetic``), so that the step is
    measured without any input pipeline; ``data`` is then ignored. The generated data and the run folder
    go to ``workdir`` (default a temporary folder) and are deleted when the bench ends, also when it
    fails, unless ``keep`` (the result's ``workdir`` then says where they are).
    """
    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix="pfc-bench-train-")) if workdir is None else Path(workdir)
    made: list[Path] = [root] if own else [root / "run"]
    try:
        res = _timed_run(config, data, steps, warmup, nproc, sets, root, device_data, made, keep)
    finally:
        if not keep:
            _remove(made, root)
    res["workdir"] = str(root) if keep else None
    return res


def _remove(made: list[Path], root: Path) -> None:
    """Delete the folders and files the bench made, then the folders they leave empty inside ``root`` (a given
    ``--workdir`` itself stays, as its other files)."""
    for path in made:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    # by place, not by name: a --workdir may itself be called "data"
    for parent in {p.parent for p in made if p.parent != root and p.parent.parent == root}:
        with contextlib.suppress(OSError):
            parent.rmdir()  # only when empty: the user's own files in it stay


def _timed_run(config: str, data: str | None, steps: int, warmup: int, nproc: int, sets: list[str], root: Path,
               device_data: bool, made: list[Path], keep: bool) -> dict[str, Any]:
    """:func:`bench_train`'s run in ``root``; what it writes there is added to ``made``."""
    from data_pipeline.property_file import dataset_files

    if device_data:
        cfg0 = load_config(resolve_config_path(config), sets)  # (synthetic data needs head.num_classes set)
        sets = [*sets, 'data.loader="synthetic"']
        if cfg0.head.num_classes is None:
            sets.append("head.num_classes=2000")
    cfg = load_config(resolve_config_path(config), sets)
    if device_data:
        data = ""
    elif data is None:
        prefix = root / "data" / "train"
        if not prefix.with_suffix(".rec").is_file():  # a kept --workdir's data is used again, and stays
            made += dataset_files(prefix)
        generate_once(prefix, 200, 10, needs_val_bin=False, image_size=cfg.model.image_size, val_identities=0,
                      seed=cfg.train.seed)
        data = str(prefix)
    out = root / "run"
    total = warmup + steps
    run_sets = [*sets, f"data.prefix={set_value(data or None)}", f"output={set_value(str(out))}", "data.val_bins=[]",
                f"train.steps={total}", "log.every_steps=1", f"checkpoint.every_steps={10**9}",
                "checkpoint.resume=false", f"eval.every_steps={10**9}", f"eval.discrepancy_every_steps={10**9}",
                *fitted_schedule(cfg, total)]
    shutil.rmtree(out, ignore_errors=True)  # the benchmark's own scratch run: resume=false refuses a used one
    code = run_training(config, run_sets, nproc)
    if code:
        where = f"output in {out}" if keep else "its run folder is deleted; --keep keeps it"
        raise TrainingRunFailed(f"the benchmark's training run failed with exit code {code} ({where})")
    rows = metrics_rows(out)
    global_batch = cfg.train.batch_size * nproc * cfg.optim.grad_accum
    res = summarise(rows, warmup, global_batch)
    summary = json.loads((out / "summary.json").read_text())
    ran_on = summary["device"]  # rank 0's, as the trainer picked it
    res.update(config=str(config), device=ran_on["type"], device_name=ran_on["name"], backbone=cfg.model.backbone,
               image_size=cfg.model.image_size, batch_per_rank=cfg.train.batch_size, world_size=nproc,
               data=data or "synthetic, on the device", amp=cfg.train.amp, channels_last=cfg.train.channels_last,
               loader=cfg.data.loader, workers=cfg.data.workers, kernels=summary.get("kernels"),
               peak_memory_bytes_rank0=max(r["memory_bytes"] for r in rows))
    return res
