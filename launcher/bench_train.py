"""`pfc bench train`: images/s and the step-time split of a real training run (torchrun, N ranks).

The run is the ordinary trainer on a config (synthetic data when none is given), with checkpoints and
evaluation pushed out of the timed window; per-step figures come from its ``metrics.jsonl``
(``log.every_steps=1``) and the first ``warmup`` steps are dropped.
"""

from __future__ import annotations

import itertools
import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from launcher.config import load_config, resolve_config_path
from launcher.distributed import torchrun

SPLIT = ("time_data_s", "time_forward_s", "time_backward_s", "time_comm_s", "time_optimizer_s")


def summarise(rows: list[dict[str, Any]], warmup: int, global_batch: int) -> dict[str, Any]:
    """Median step time (from consecutive log times) and median split over the steps after warm-up."""
    rows = sorted((r for r in rows if "loss" in r and "time_forward_s" in r), key=lambda r: r["step"])
    timed = [r for r in rows if r["step"] > warmup]
    if len(timed) < 2:
        raise ValueError(f"need at least 2 logged steps after {warmup} warm-up steps, got {len(timed)}")
    gaps = [b["time"] - a["time"] for a, b in itertools.pairwise(timed) if b["step"] == a["step"] + 1]
    step_s = statistics.median(gaps)
    split = {k: statistics.median(r.get(k, 0.0) for r in timed) for k in SPLIT}
    return {"step_s": step_s, "images_per_s": global_batch / step_s, "split_s": split,
            "split_fraction": {k: v / step_s for k, v in split.items()}, "steps_timed": len(gaps)}


def bench_train(config: str, data: str | None, steps: int, warmup: int, nproc: int, sets: list[str],
                workdir: Path | None = None) -> dict[str, Any]:
    cfg = load_config(resolve_config_path(config), sets)
    tmp = Path(workdir or tempfile.mkdtemp(prefix="pfc-bench-train-"))
    if data is None:
        from data_pipeline.synth import generate

        prefix = tmp / "data" / "train"
        if not prefix.with_suffix(".rec").is_file():
            generate(prefix, 200, 10, image_size=cfg.model.image_size, val_identities=0,
                     seed=cfg.train.seed)
        data = str(prefix)
    out = tmp / "run"
    total = warmup + steps
    run_sets = [*sets, f"data.prefix={json.dumps(data)}", f"output={json.dumps(str(out))}", "data.val_bins=[]",
                f"train.steps={total}", "log.every_steps=1", f"checkpoint.every_steps={10**9}",
                "checkpoint.resume=false", f"eval.every_steps={10**9}", f"eval.discrepancy_every_steps={10**9}",
                # a short benchmark may be shorter than the recipe's warm-up (refused by the config otherwise)
                f"optim.warmup_steps={min(cfg.optim.warmup_steps, total)}"]
    shutil.rmtree(out, ignore_errors=True)  # the benchmark's own scratch run: resume=false refuses a used one
    code = torchrun(["train", config, *[a for s in run_sets for a in ("--set", s)]], nproc)
    if code:
        raise RuntimeError(f"the benchmark's training run failed with exit code {code} (output in {out})")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    global_batch = cfg.train.batch_size * nproc * cfg.optim.grad_accum
    res = summarise(rows, warmup, global_batch)
    res.update(config=str(config), backbone=cfg.model.backbone, image_size=cfg.model.image_size,
               batch_per_rank=cfg.train.batch_size, world_size=nproc, data=data,
               peak_memory_bytes_rank0=max(r["memory_bytes"] for r in rows))
    return res
