"""`make gpu-check`'s summary table (printed last, and into the log): one row per step, and a row per
figure under the steps that have several (head shapes, amp modes, the training runs)."""

from __future__ import annotations

from typing import Any


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(step, status, seconds, detail) rows of the summary table printed last."""
    def f(x: Any, fmt: str) -> str:
        return format(x, fmt) if isinstance(x, int | float) else "-"

    rows: list[tuple[str, str, str, str]] = []
    steps = result["steps"]
    for name, rec in steps.items():
        st, secs = rec.get("status", "?"), f(rec.get("seconds"), ".0f")
        detail = ""
        if name == "env" and st == "ok":
            e = result.get("env", {})
            smi = (e.get("nvidia_smi") or "").split(",")
            detail = (f"{e.get('device', 'no CUDA')}; torch {e.get('torch')}; driver "
                      f"{smi[1].strip() if len(smi) > 1 else '-'}; {e.get('cpu_count')} cores")
        elif name == "pytest_gpu" and "counts" in rec:
            c = rec["counts"]
            detail = f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"
        rows.append((name, st, secs, detail or rec.get("error", "")[:90]))
        if name == "bench_head":
            for key, r in rec.get("shapes", {}).items():
                if "step_s" in r:
                    rows.append((f"  head {key}", "ok", "", f"step {r['step_s'] * 1e3:.1f} ms = "
                                 f"{r['ratio_to_floor']:.2f}x floor; mem "
                                 f"{r['peak_over_weights_plus_momentum']:.2f}x W+mom; "
                                 f"{r['measured_over_planned']:.2f}x plan; {r['launches_per_step']}"))
                else:
                    rows.append((f"  head {key}", "failed", "", r.get("error", "")[:90]))
            b = rec.get("bf16")
            if b is not None:  # the head stored in bf16 (stochastic rounding) at the first C
                key = f"  head C={b.get('num_classes')} bf16"
                rows.append((key, "ok", "", f"step {b['step_s'] * 1e3:.1f} ms = {b['ratio_to_floor']:.2f}x floor"
                             + (f" = {b['step_over_fp32_step']:.2f}x fp32" if "step_over_fp32_step" in b else "")
                             + f"; mem {b['peak_over_weights_plus_momentum']:.2f}x W+mom; "
                             f"{b['measured_over_planned']:.2f}x plan") if "step_s" in b else
                            (key, "failed", "", b.get("error", "")[:90]))
        if name.startswith("bench_train"):
            parts = {"bf16": rec.get("bf16"), "fp16": rec.get("fp16")} if name.endswith("device") \
                else {"loader": rec}
            for k, r in parts.items():
                if r and "images_per_s" in r:
                    fl = (f" = {r['step_over_floor']:.2f}x floor {r['floor_images_per_s']:.0f}/s"
                          if "step_over_floor" in r else "")
                    rows.append((f"  {k}", "ok", "", f"{r['images_per_s']:.0f} images/s{fl}; peak "
                                 f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"))
        if name in ("train_e2e", "train_deepspeed") and "first_run" in rec:
            fr, rr = rec["first_run"], rec["resumed_run"]
            evals: dict[str, Any] = fr.get("eval") or {}
            first_eval: dict[str, Any] = next(iter(evals.values()), {})
            acc = first_eval.get("accuracy")
            evaluated = f", eval acc {f(acc, '.3f')}" if evals else ""
            rows.append((f"  {'e2e' if name == 'train_e2e' else 'zero-1'}", st, "",
                         f"{fr['steps']} steps {fr['wall_s']} s{evaluated}; "
                         f"resumed to {rr['steps']} in {rr['wall_s']} s"))
    return rows
