#!/usr/bin/env python3
"""`make gpu-check`: the GPU path once, measured, in under 8 minutes on one GPU (issue 16).

Steps, each a subprocess with its own time budget, guarded so that one failure does not stop the
rest (its error goes into the JSON):

  env          python, torch, CUDA device, driver, free memory, cores
  pytest_gpu   the tests marked ``gpu`` (GPU_TEST_PATHS): equivalence law on CUDA, fp32 logits under
               autocast, fp16 scaler skip/recover, NCCL with one rank, checkpoints GPU <-> CPU, launches
               flat in C, every dtype and optimizer vs float64, CUDA RNG in checkpoints, determinism,
               stochastic rounding's bits on the GPU equal the CPU's
  bench_head   `pfc bench head` at C = 1M, 10M and the largest C `pfc plan` says fits (r = 0.1,
               D = 512, B = 512, W = 1): step, GEMM floor, ratio, memory vs weights + momentum and
               vs the planner's prediction; and at 1M with the head stored in bf16 (``--dtype bf16``,
               stochastic rounding of its updates), against the fp32 step
  bench_train_device  `pfc bench train` iresnet50 112x112, channels_last, batches made on the GPU,
               bf16 autocast and fp16 with the scaler, each against the backbone's forward + backward alone
  synth        `pfc data synth` of a small record file (its time is a figure too)
  train_e2e    `pfc train` 200 steps (iresnet18, r = 0.1, DiscFace on, evaluation, checkpoint) in a
               one-rank process group (NCCL, DDP), then a resume for 50 more
  bench_train_loader  `pfc bench train` iresnet50 bf16 fed by the torch loader from that file
  train_deepspeed  `pfc train` under DeepSpeed ZeRO-1 (iresnet18, bf16, NCCL): 30 steps and a checkpoint,
               then a resume for 10 more (DeepSpeed from the carried wheels)

Writes ``gpu_check.json`` (every figure, every error) and ``gpu_check.log`` (every command and its
output) into --out (default $OUT, else runs/gpu-check) and prints a summary table last.

``--dry-run`` runs the same steps on the CPU at tiny sizes (the gpu tests through their CPU
stand-in), in about a minute: a test in the suite runs it so that this script cannot rot.

Standard library only in this process (it never touches the GPU itself): every measurement runs in
a child, ``python -m launcher ...`` with this repository on PYTHONPATH. The plumbing (budgets, the
log, the JSON record, the summary table) is ``scripts/gpu_check_runner.py``; the steps are here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpu_check_head import head_record, largest_c
from gpu_check_runner import DRY_BUDGET_FACTOR, REPO, TOTAL_BUDGET_S, Runner, StepError, StepTimeout
from gpu_check_summary import summary_rows

sys.path.insert(0, str(REPO))


# Seconds before its budget ends that the pytest step interrupts pytest, which then writes its report.
PYTEST_INTERRUPT_S = 15.0
# Where the tests marked ``gpu`` live (collecting the whole suite would import what this machine lacks).
GPU_TEST_PATHS = ("tests/gpu", "tests/partialfc/test_head_cuda.py", "tests/launcher/trainer/test_checkpoint_devices.py",
                  "tests/launcher/test_settings_train.py", "tests/partialfc/test_stochastic_rounding.py")


class Check(Runner):
    """The steps of `make gpu-check`; each returns its figures (a dict) or raises."""

    def s_env(self) -> dict[str, Any]:
        code = ("import json, os, sys, torch, numpy\n"
                "d = {'python': sys.version.split()[0], 'torch': torch.__version__, 'numpy': numpy.__version__,\n"
                "     'cuda_available': torch.cuda.is_available(), 'cuda': torch.version.cuda,\n"
                "     'cpu_count': os.cpu_count()}\n"
                "def opt(key, f):\n"
                "    try:\n"
                "        d[key] = f()\n"
                "    except Exception as e:\n"
                "        d[key + '_error'] = f'{type(e).__name__}: {e}'\n"
                "if torch.cuda.is_available():\n"
                "    opt('memory_free_bytes', lambda: torch.cuda.mem_get_info(0)[0])\n"
                "    opt('memory_total_bytes', lambda: torch.cuda.mem_get_info(0)[1])\n"
                "    opt('device', lambda: torch.cuda.get_device_name(0))\n"
                "    opt('device_count', torch.cuda.device_count)\n"
                "    opt('capability', lambda: list(torch.cuda.get_device_capability(0)))\n"
                "    opt('nccl', lambda: str(torch.cuda.nccl.version()))\n"
                "    opt('cudnn', torch.backends.cudnn.version)\n"
                "opt('pydantic', lambda: __import__('pydantic').VERSION)\n"
                "opt('launcher_imports', lambda: bool(__import__('launcher.cli')))\n"
                "print('ENV ' + json.dumps(d, default=str))\n")
        out = self.sh([sys.executable, "-c", code])
        info: dict[str, Any] = json.loads(next(x for x in out.splitlines() if x.startswith("ENV "))[4:])
        info["machine"] = platform.machine()
        info["host_python"] = sys.executable
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            if smi.returncode == 0:
                info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.dry:
            info["memory_total_bytes_assumed"] = 16 << 20  # the dry run's pretend device for `largest C`
        self.result["env"] = info
        if "launcher_imports_error" in info:  # every later step runs `python -m launcher`
            return {**info, "status": "failed", "error": "import launcher failed (wheels in .whl/? make "
                    f"gpu-wheels): {info['launcher_imports_error']}"}
        if not self.dry and not info.get("cuda_available"):  # every later step would run on the CPU
            return {**info, "status": "failed", "error": f"torch {info.get('torch')} sees no CUDA device "
                    f"(nvidia-smi: {info.get('nvidia_smi', 'no answer')}); nothing else is run"}
        return info

    def s_pytest(self) -> dict[str, Any]:
        junit = self.work / "junit_gpu.xml"
        late = ""
        try:
            # Interrupted (SIGINT) before the budget ends, pytest still writes the report of the tests it
            # finished: a run that runs out of time keeps their results instead of losing every one.
            out = self.sh([sys.executable, "-m", "pytest", "-m", "gpu", *GPU_TEST_PATHS, "-q", "-p",
                           "no:cacheprovider", f"--junitxml={junit}", "-o", "timeout=60"], check=False,
                          interrupt_s=PYTEST_INTERRUPT_S)
        except StepTimeout as e:
            out, late = "", str(e)
        if not junit.is_file():
            raise StepError(late or "pytest wrote no report: " + " | ".join(out.strip().splitlines()[-3:]))
        root = ET.parse(junit).getroot()
        cases = []
        for tc in root.iter("testcase"):
            if not tc.get("name"):  # the test an interrupt stopped: pytest reports it without a name
                continue
            outcome, msg = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = tc.find(tag)
                if el is not None:
                    outcome = "failed" if tag in ("failure", "error") else "skipped"
                    msg = (el.get("message") or "")[:300]
            cases.append({"test": f"{tc.get('classname', '')}::{tc.get('name', '')}", "outcome": outcome,
                          "seconds": float(tc.get("time", 0.0)), **({"message": msg} if msg else {})})
        counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "skipped")}
        rec: dict[str, Any] = {"counts": counts, "tests": cases}
        if late:
            rec.update(status="failed", error=f"{late} (interrupted; {len(cases)} test(s) reported)")
        elif counts["failed"] or not cases or not counts["passed"]:
            rec["status"] = "failed"
            rec["error"] = (f"{counts['failed']} gpu test(s) failed" if counts["failed"] else
                            "no gpu test passed (all skipped)" if cases else "no gpu test collected")
        return rec

    def _head_run(self, c: int, dtype: str, batch: int, dim: int, steps: int, warmup: int,
                  floor_after: bool) -> dict[str, Any]:
        """One `pfc bench head` (W = 1, r = 0.1) of ``c`` classes stored in ``dtype``, with the planner's
        prediction of the same (`pfc plan ... --dtype DTYPE --device cuda`, cpu in the dry run; in this
        process: the planner is plain Python)."""
        from launcher.planner import plan_rank

        plan = plan_rank(c, 1, batch, dim, 0.1, dtype, discface=False, device=self.device).to_dict()
        path = self.work / f"head_{c}_{dtype}.json"
        args = ["bench", "head", "--classes", str(c), "--dim", str(dim), "--batch", str(batch), "--sample-rate",
                "0.1", "--world-size", "1", "--steps", str(steps), "--warmup", str(warmup), "--dtype", dtype,
                "--json", str(path)]
        self.pfc(*args, *(["--floor", "after"] if floor_after else []))  # after: tight on memory, head freed
        return head_record(c, json.loads(path.read_text()), plan["total_bytes"])

    def s_bench_head(self) -> dict[str, Any]:
        if self.dry:
            batch, dim, steps, warmup, sizes = 32, 64, 2, 1, [1000, 4000]
        else:
            batch, dim, steps, warmup, sizes = 512, 512, 5, 2, [1_000_000, 10_000_000]
        largest, budget = largest_c(self.result.get("env", {}), self.dry, self.device, batch, dim, 0.1)
        runs: dict[str, Any] = {"largest_c_memory_budget_bytes": budget, "shapes": {}}
        # The bf16 head (its updates stored with stochastic rounding, the head's default) at the first C, right
        # after the fp32 run of that C: a short run, not left to whatever time the largest C leaves.
        order = [(sizes[0], "fp32"), (sizes[0], "bf16"), *((c, "fp32") for c in [*sizes[1:], largest])]
        for c, dtype in order:
            try:
                rec = self._head_run(c, dtype, batch, dim, steps, warmup, floor_after=c == largest)
            except Exception as e:
                rec = {"num_classes": c, "status": "failed", "error": f"{type(e).__name__}: {e}"}
            if dtype == "fp32":
                runs["shapes"][f"C={c}"] = {"largest_that_fits": c == largest, **rec}
            else:
                fp32 = runs["shapes"].get(f"C={c}", {})
                if "step_s" in rec and "step_s" in fp32:
                    rec["step_over_fp32_step"] = rec["step_s"] / fp32["step_s"]
                runs[dtype] = {"rounding": "stochastic", **rec}
        failed = [k for k, v in runs["shapes"].items() if v.get("status") == "failed"]
        failed += [f"bf16 C={sizes[0]}"] if runs["bf16"].get("status") == "failed" else []
        if failed:
            runs["status"] = "failed"
            runs["error"] = "failed at " + ", ".join(failed)
        return runs

    def _r50_sets(self, amp: str) -> list[str]:
        if self.dry:
            base = ["model.backbone=tiny", "model.image_size=32", "model.embedding_size=64", "train.batch_size=8",
                    "head.num_classes=500"]
        else:
            base = ["model.backbone=iresnet50", "model.image_size=112", "model.embedding_size=512",
                    "train.batch_size=128", "head.num_classes=93431"]
        return [*base, f'train.amp="{amp}"', "train.channels_last=true", "head.sample_rate=0.1",
                "metrics.enabled=false", "data.val_bins=[]", 'dist.backend="auto"']

    def _bench_train(self, amp: str, data: str | None, extra: list[str], tag: str) -> dict[str, Any]:
        steps, warmup = ("2", "1") if self.dry else ("30", "10")
        path = self.work / f"bench_train_{tag}.json"
        args = ["bench", "train", "--config", "ms1mv3_r50_pfc01_discface", "--nproc", "1", "--steps", steps,
                "--warmup", warmup, "--json", str(path)]
        args += ["--device-data", "--floor"] if data is None else ["--data", data]
        for s in [*self._r50_sets(amp), *extra]:
            args += ["--set", s]
        self.pfc(*args)
        r = json.loads(path.read_text())
        rec = {"images_per_s": r["images_per_s"], "step_s": r["step_s"], "split_s": r["split_s"],
               "peak_memory_bytes": r["peak_memory_bytes_rank0"], "backbone": r["backbone"],
               "batch_per_rank": r["batch_per_rank"], "amp": r["amp"], "channels_last": r["channels_last"],
               "loader": r["loader"], "workers": r["workers"], "kernels": r["kernels"]}
        if "backbone_floor" in r:
            fl = r["backbone_floor"]
            rec.update(floor_images_per_s=fl["images_per_s"], floor_peak_memory_bytes=fl["peak_memory_bytes"],
                       step_over_floor=r["step_over_floor_images_per_s"])
        return rec

    def s_bench_train_device(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        # On the CPU (dry run) autocast is off and both would run the same fp32 path: one is enough there.
        for amp in ("bf16",) if self.dry else ("bf16", "fp16"):
            try:
                out[amp] = self._bench_train(amp, None, [], f"device_{amp}")
            except Exception as e:
                out[amp] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        bad = [k for k, v in out.items() if v.get("status") == "failed"]
        if bad:
            out.update(status="failed", error="failed: " + ", ".join(bad))
        return out

    def s_synth(self) -> dict[str, Any]:
        ids, per, size = (50, 4, 32) if self.dry else (2000, 10, 112)
        prefix = self.work / "synth" / "train"
        summary = self.work / "synth.json"
        t0 = time.monotonic()
        self.pfc("data", "synth", str(prefix), "--identities", str(ids), "--images-per-identity", str(per),
                 "--image-size", str(size), "--val-identities", "40" if self.dry else "200",
                 "--val-pairs", "100" if self.dry else "600", "--no-progress", "--json", str(summary))
        rep = json.loads(summary.read_text())
        self.result["synth_prefix"] = str(prefix)
        return {"images": rep.get("images"), "identities": ids, "image_size": size,
                "wall_s": round(time.monotonic() - t0, 1), "train_seconds": rep.get("train_seconds"),
                "images_per_s": rep.get("images_per_s"), "workers": rep.get("workers"),
                "rec_bytes": rep.get("rec_bytes"), "val_bin": rep.get("val_bin")}

    def _small_run_sets(self, total: int, first: int) -> list[str]:
        """iresnet18 (tiny in the dry run), r = 0.1 with DiscFace, stopped at ``first`` of ``total`` steps with
        a checkpoint there, in a process group of one rank (the agreements and gathers under NCCL)."""
        return [f"model.backbone={'tiny' if self.dry else 'iresnet18'}",
                f"model.image_size={32 if self.dry else 112}", f"model.embedding_size={64 if self.dry else 512}",
                f"train.batch_size={16 if self.dry else 128}", "head.num_classes=null", "head.sample_rate=0.1",
                "head.discface_lambda=0.1", f"train.steps={total}", f"train.stop_after={first}",
                'train.amp="none"' if self.dry else 'train.amp="bf16"', "train.channels_last=true",
                f"checkpoint.every_steps={first}", f"data.workers={1 if self.dry else 12}", 'data.loader="torch"',
                "metrics.enabled=false", f"log.every_steps={2 if self.dry else 50}",
                f"optim.warmup_steps={2 if self.dry else 20}", 'dist.backend="auto"', "dist.group_for_one_rank=true"]

    def _train_and_resume(self, name: str, total: int, first: int, extra: list[str],
                          val_bin: str | None) -> dict[str, Any]:
        """`pfc train` to step ``first``, then the same command to ``total`` (it resumes from the checkpoint
        at ``first``): both runs' figures, and what went wrong in ``error``."""
        prefix = self.result.get("synth_prefix")
        if not prefix:
            raise StepError("no record file: the synth step failed")
        run = self.work / name
        args = ["train", "ms1mv3_r50_pfc01_discface", "--data", prefix, "--output", str(run)]
        args += ["--val-bin", val_bin] if val_bin else []
        for s in [*self._small_run_sets(total, first), *extra]:
            args += ["--set", s]
        t0 = time.monotonic()
        self.pfc(*args)
        first_s = time.monotonic() - t0
        s1 = json.loads((run / "summary.json").read_text())
        latest = (run / "checkpoints" / "latest").read_text().strip()
        t1 = time.monotonic()
        log2 = self.pfc(*args, "--set", f"train.stop_after={total}")  # same run folder: resumes (last --set wins)
        second_s = time.monotonic() - t1
        s2 = json.loads((run / "summary.json").read_text())
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        resumed = "resumed from" in log2
        rec: dict[str, Any] = {
            "first_run": {"steps": s1["steps"], "wall_s": round(first_s, 1), "train_seconds": s1["seconds"],
                          "eval": s1.get("eval"), "checkpoint": latest, "final": s1.get("final"),
                          "kernels": s1.get("kernels")},
            "resumed_run": {"steps": s2["steps"], "wall_s": round(second_s, 1), "train_seconds": s2["seconds"],
                            "resumed": resumed, "final": s2.get("final")},
            "loss_first_last": [losses[0], losses[-1]] if losses else None}
        problems = []
        if s1["steps"] != first:
            problems.append(f"first run stopped at step {s1['steps']}, expected {first}")
        if val_bin and not s1.get("eval"):
            problems.append("no evaluation result")
        if s2["steps"] != total or not resumed:
            problems.append(f"resume: ended at step {s2['steps']} (expected {total}), "
                            f"'resumed from' in its log: {resumed}")
        if problems:
            rec.update(status="failed", error="; ".join(problems))
        return rec

    def s_train_e2e(self) -> dict[str, Any]:
        """200 steps with an evaluation and a checkpoint (DDP over NCCL), then 50 more from it."""
        total, first = (6, 4) if self.dry else (250, 200)
        prefix = self.result.get("synth_prefix") or ""
        return self._train_and_resume("train_run", total, first, [f"eval.every_steps={first}", "eval.batch_size=256"],
                                      str(Path(prefix).parent / "synth_val.bin"))

    def s_train_deepspeed(self) -> dict[str, Any]:
        """DeepSpeed ZeRO-1 (NCCL on one GPU; gloo in the dry run): 30 steps and a ZeRO checkpoint, then 10 more
        from it. DeepSpeed comes from the carried wheels (`make gpu-wheels`)."""
        try:
            self.sh([sys.executable, "-c", "import deepspeed; print('deepspeed', deepspeed.__version__)"])
        except StepError as e:
            raise StepError(f"deepspeed does not import (make gpu-wheels carries it): {e}") from None
        total, first = (6, 4) if self.dry else (40, 30)
        return self._train_and_resume("train_deepspeed_run", total, first,
                                      ['dist.engine="deepspeed"', "dist.zero_stage=1", "data.val_bins=[]"],
                                      None)

    def s_bench_train_loader(self) -> dict[str, Any]:
        prefix = self.result.get("synth_prefix")
        if not prefix:
            raise StepError("no record file: the synth step failed")
        cores = os.cpu_count() or 1
        workers = 1 if self.dry else max(1, cores - 2)
        sets = [f"data.workers={workers}", 'data.loader="torch"']
        if self.dry:
            sets += ["train.batch_size=8"]
        return self._bench_train("bf16", prefix, sets, "loader")

    def summary_rows(self) -> list[tuple[str, str, str, str]]:
        return summary_rows(self.result)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default $OUT, else runs/gpu-check)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script itself")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"total time budget in seconds (default {TOTAL_BUDGET_S:g}; "
                         f"x{DRY_BUDGET_FACTOR:g} with --dry-run)")
    ap.add_argument("--only", default="", help="comma-separated step names to run (default: all)")
    args = ap.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or REPO / "runs" / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s if args.budget_s is not None else TOTAL_BUDGET_S * (DRY_BUDGET_FACTOR if args.dry_run else 1)
    chk = Check(out, args.dry_run, budget)
    # name, budget (s), step; ordered by what matters most if time runs out.
    plan: list[tuple[str, float, Callable[[], dict[str, Any]]]] = [
        ("env", 40, chk.s_env),
        ("pytest_gpu", 100, chk.s_pytest),
        ("bench_head", 150, chk.s_bench_head),  # 4 runs: 1M fp32 and bf16, 10M, the largest
        ("bench_train_device", 110, chk.s_bench_train_device),
        ("synth", 45, chk.s_synth),
        ("train_e2e", 110, chk.s_train_e2e),
        ("bench_train_loader", 60, chk.s_bench_train_loader),
        ("train_deepspeed", 70, chk.s_train_deepspeed),
    ]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - {p[0] for p in plan}
    if unknown:
        ap.error(f"--only: unknown step(s) {sorted(unknown)}; steps: {[p[0] for p in plan]}")
    for name, budget, fn in plan:
        if only and name not in only and name != "env":
            continue
        if name != "env" and chk.result["steps"]["env"]["status"] == "failed":
            chk.result["steps"][name] = {"status": "skipped", "error": "the env step failed"}
            continue
        chk.step(name, budget, fn)
    chk.save()
    chk.print_summary()
    chk.log.close()
    failed = [k for k, v in chk.result["steps"].items() if v.get("status") != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
