"""The README's GPU table from `make gpu-check`'s `gpu_check.json`: every figure the issue asks for, with
the card, the driver and the date, so that a session with a GPU fills the table without copying numbers
by hand.

    python scripts/gpu_readme_table.py runs/gpu-check/gpu_check.json            # print the block
    python scripts/gpu_readme_table.py runs/gpu-check/gpu_check.json --write README.md

``--write`` replaces the text between the README's ``<!-- gpu-table:begin -->`` and ``<!-- gpu-table:end -->``
lines; it refuses a dry run's file (CPU figures are not GPU figures). A step that failed or did not run
reads "failed: ..." or "not run" in its row, never a blank that looks measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- gpu-table:begin -->", "<!-- gpu-table:end -->"
#: The table's rows: (figure, goal); their order is the README's.
ROWS = [
    ("`gpu` tests (equivalence law float64 / float32, autocast, fp16 scaler, NCCL W = 1, checkpoints, "
     "deterministic kernels)", "all pass"),
    ("head step / GEMM floor, C = 1M, r = 0.1, D = 512, B = 512", ""),
    ("head step / GEMM floor, C = 10M", "<= 1.5"),
    ("head step / GEMM floor, largest C `pfc plan` says fits", ""),
    ("head memory / weights + momentum (1M, 10M, largest)", "<= 1.25"),
    ("head memory measured / `pfc plan`'s prediction (1M, 10M, largest)", ""),
    ("iresnet50 112 px bf16 channels_last, data on the GPU: images/s, peak memory", ""),
    ("the same / backbone forward + backward alone", ">= 0.85"),
    ("iresnet50 fp16 + scaler: images/s / floor", ""),
    ("iresnet50 bf16 fed by the torch loader (16 cores): images/s", ""),
    ("`pfc data synth` 20,000 images at 112 px on 16 cores", ""),
    ("`pfc train` iresnet18 200 steps (r = 0.1, DiscFace, eval, checkpoint) + resume 50", "completes, resumes"),
    ("`pfc train` DeepSpeed ZeRO-1, iresnet18 bf16, 30 steps + checkpoint + resume 10", "completes, resumes"),
]
GIB = 2**30


def _step(doc: dict[str, Any], name: str) -> tuple[dict[str, Any] | None, str]:
    """A step's record, or None and what the row says instead of a figure."""
    rec = doc.get("steps", {}).get(name)
    if rec is None:
        return None, "not run"
    if rec.get("status") == "skipped":
        return None, f"not run ({rec.get('error', 'skipped')})"
    return rec, ""


def _failed(rec: dict[str, Any]) -> str:
    return "failed: " + " ".join(str(rec.get("error", "no figure recorded")).split())[:160]


def _shapes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """bench_head's three shapes in the script's order: 1M, 10M, the largest that fits (tiny in a dry run)."""
    rec = doc.get("steps", {}).get("bench_head") or {}
    return list(rec.get("shapes", {}).values())


def _head_step(doc: dict[str, Any], i: int) -> str:
    rec, why = _step(doc, "bench_head")
    if rec is None:
        return why
    shapes = _shapes(doc)
    if i >= len(shapes):
        return _failed(rec)
    s = shapes[i]
    if "ratio_to_floor" not in s:
        return _failed(s)
    launches = s.get("launches_per_step") or {}
    extra = ", ".join(f"{v} {k}" for k, v in launches.items())
    text = (f"C = {s['num_classes']:,}: {s['ratio_to_floor']:.2f} (step {s['step_s'] * 1e3:.1f} ms, floor "
            f"{s['gemm_floor_s'] * 1e3:.1f} ms{'; ' + extra + ' per step' if extra else ''})")
    return text + (_bf16_head(rec) if i == 0 else "")


def _bf16_head(rec: dict[str, Any]) -> str:
    """The bf16 head's run at the first C (``--dtype bf16``, stochastic rounding), after that C's fp32 figure;
    nothing where the record has none (a gpu_check.json from before the run was added)."""
    b = rec.get("bf16")
    if b is None:
        return ""
    if "ratio_to_floor" not in b:
        return f"; bf16 head {_failed(b)}"
    vs_fp32 = f" = {b['step_over_fp32_step']:.2f}x the fp32 step" if "step_over_fp32_step" in b else ""
    return (f"; bf16 head ({b.get('rounding', 'stochastic')} rounding): {b['ratio_to_floor']:.2f} (step "
            f"{b['step_s'] * 1e3:.1f} ms{vs_fp32}; memory {b['peak_over_weights_plus_momentum']:.2f}x its "
            f"weights + momentum, {b['measured_over_planned']:.2f}x plan)")


def _head_ratios(doc: dict[str, Any], key: str) -> str:
    rec, why = _step(doc, "bench_head")
    if rec is None:
        return why
    shapes = _shapes(doc)
    if not shapes:
        return _failed(rec)
    return ", ".join(f"{s[key]:.2f}" if key in s else "failed" for s in shapes)


def _figure(doc: dict[str, Any], name: str, key: str, fmt: Callable[[dict[str, Any]], str],
            part: str | None = None) -> str:
    """Step ``name``'s figure (its record, or its ``part``, formatted), or why the row has none: the step
    did not run, it failed, or its record lacks ``key``."""
    rec, why = _step(doc, name)
    if rec is None:
        return why
    r = rec.get(part) if part else rec
    if r is None and rec.get("status") == "ok":
        return "not run" + (" (a dry run times bf16 only)" if doc.get("dry_run") else "")
    if not r or key not in r:
        return _failed(r or rec)
    return fmt(r)


def _autotuner(r: dict[str, Any]) -> str:
    """Whether the run had cuDNN's autotuner on (its summary's ``kernels``), where the record says."""
    on = (r.get("kernels") or {}).get("cudnn_benchmark")
    return "" if on is None else f", cuDNN autotuner {'on' if on else 'off'}"


def _gpu_tests(rec: dict[str, Any]) -> str:
    c = rec["counts"]
    text = f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"
    bad = [t["test"].rsplit("::", 1)[-1] for t in rec.get("tests", []) if t["outcome"] == "failed"]
    return text + (f" (failed: {', '.join(bad[:6])})" if bad else "")


def _synth(rec: dict[str, Any]) -> str:
    return (f"{rec['images']:,} images in {rec['wall_s']} s ({rec['images_per_s']:.0f} images/s while writing, "
            f"workers: {rec['workers']})")


def _e2e(rec: dict[str, Any]) -> str:
    fr, rr = rec["first_run"], rec["resumed_run"]
    evals: dict[str, dict[str, Any]] = fr.get("eval") or {}
    acc = next(iter(evals.values()), {}).get("accuracy")
    evaluated = f", eval accuracy {acc:.3f}" if isinstance(acc, float) else ""  # the ZeRO-1 run has none
    text = (f"{fr['steps']} steps in {fr['wall_s']} s{evaluated}, checkpoint {fr.get('checkpoint')}; "
            f"resumed to step {rr['steps']} in {rr['wall_s']} s")
    return text if rec.get("status") == "ok" else f"{text}; {_failed(rec)}"


def figures(doc: dict[str, Any]) -> list[str]:
    """One measured figure per row of :data:`ROWS`."""
    def ips(r: dict[str, Any]) -> str:
        return f"{r['images_per_s']:.0f} images/s"

    return [
        _figure(doc, "pytest_gpu", "counts", _gpu_tests),
        _head_step(doc, 0), _head_step(doc, 1), _head_step(doc, 2),
        _head_ratios(doc, "peak_over_weights_plus_momentum"), _head_ratios(doc, "measured_over_planned"),
        _figure(doc, "bench_train_device", "images_per_s", part="bf16",
                fmt=lambda r: f"{ips(r)} ({r['batch_per_rank']} per step), "
                f"peak {r['peak_memory_bytes'] / GIB:.1f} GiB{_autotuner(r)}"),
        _figure(doc, "bench_train_device", "step_over_floor", part="bf16",
                fmt=lambda r: f"{r['step_over_floor']:.2f} (floor {r['floor_images_per_s']:.0f} images/s)"),
        _figure(doc, "bench_train_device", "images_per_s", part="fp16",
                fmt=lambda r: f"{ips(r)}, {r['step_over_floor']:.2f} of its floor ({r['floor_images_per_s']:.0f} "
                "images/s)" if "step_over_floor" in r else ips(r)),
        _figure(doc, "bench_train_loader", "images_per_s", lambda r: f"{ips(r)} (data.workers = {r['workers']})"),
        _figure(doc, "synth", "images_per_s", _synth),
        _figure(doc, "train_e2e", "first_run", _e2e),
        _figure(doc, "train_deepspeed", "first_run", _e2e),
    ]


def _card(doc: dict[str, Any]) -> str:
    env = doc.get("env", {})
    smi = [x.strip() for x in (env.get("nvidia_smi") or "").splitlines()[0].split(",")] if env.get("nvidia_smi") else []
    card = env.get("device") or (smi[0] if smi else "no CUDA device")
    driver = smi[1] if len(smi) > 1 else "unknown"
    date = str(doc.get("started_at", "unknown date"))[:10]
    return (f"Card, driver, date: {card} (on a machine of {env.get('cpu_count')} CPU cores), driver {driver}, "
            f"CUDA {env.get('cuda')}, torch {env.get('torch')}, {date}; `make gpu-check` took {doc.get('seconds')} s.")


def block(doc: dict[str, Any]) -> str:
    """The README's text between the markers: the card line and the table."""
    lines = [_card(doc)]
    if doc.get("dry_run"):
        lines.append("")
        lines.append("(A dry run on the CPU: these are not GPU figures.)")
    lines += ["", "| figure | goal | measured |", "|---|---|---|"]
    # an error message may hold "|" (gpu_check joins a failed command's last lines with " | "): escaped, so the
    # row keeps its three cells
    lines += [f"| {name} | {goal} | {fig.replace('|', chr(92) + '|')} |"
              for (name, goal), fig in zip(ROWS, figures(doc), strict=True)]
    return "\n".join(lines)


def write_readme(readme: Path, text: str) -> None:
    """Replace what lies between the markers in ``readme`` with ``text``."""
    src = readme.read_text()
    if src.count(BEGIN) != 1 or src.count(END) != 1 or src.index(BEGIN) > src.index(END):
        raise SystemExit(f"{readme}: expected one {BEGIN} line followed by one {END} line")
    head, rest = src.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, help="gpu_check.json written by scripts/gpu_check.py")
    ap.add_argument("--write", type=Path, default=None, help="README to update between its gpu-table markers")
    args = ap.parse_args(argv)
    try:
        doc = json.loads(args.json.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"gpu_readme_table: {args.json}: cannot read it as JSON ({e})", file=sys.stderr)
        return 2
    text = block(doc)
    if args.write is None:
        print(text)
        return 0
    if doc.get("dry_run"):
        print(f"gpu_readme_table: {args.json} is a dry run's (CPU): not written into {args.write}", file=sys.stderr)
        return 2
    write_readme(args.write, text)
    print(f"gpu_readme_table: {args.write}: GPU table written from {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
