"""scripts/gpu_readme_table.py: the README's GPU table written from gpu_check.json (the dry run's JSON is
checked in tests/launcher/bench/test_gpu_check.py)."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "gpu_readme_table.py"
_spec = importlib.util.spec_from_file_location("gpu_readme_table", SCRIPT)
assert _spec is not None and _spec.loader is not None
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)


def _shape(c: int, ratio: float, largest: bool = False) -> dict[str, Any]:
    return {"num_classes": c, "largest_that_fits": largest, "step_s": 0.0123 * ratio, "gemm_floor_s": 0.0123,
            "ratio_to_floor": ratio, "peak_over_weights_plus_momentum": 1.11, "measured_over_planned": 0.97,
            "launches_per_step": {"kernels": 61, "syncs": 2}}


def _train(ips: float, floor: float | None = None) -> dict[str, Any]:
    rec: dict[str, Any] = {"images_per_s": ips, "peak_memory_bytes": 21 << 30, "batch_per_rank": 128, "workers": 14,
                           "kernels": {"deterministic": False, "cudnn_benchmark": True}}
    if floor:
        rec.update(floor_images_per_s=floor, step_over_floor=ips / floor)
    return rec


def _gpu_doc() -> dict[str, Any]:
    """A gpu_check.json as a real run writes it (made-up figures, the script's keys)."""
    return {
        "dry_run": False, "started_at": "2027-01-05T10:00:00Z", "seconds": 431.2,
        "env": {"device": "NVIDIA H200", "cpu_count": 16, "cuda": "13.0", "torch": "2.11.0+cu130",
                "nvidia_smi": "NVIDIA H200, 580.65.06, 143771 MiB"},
        "steps": {
            "env": {"status": "ok"},
            "pytest_gpu": {"status": "ok", "counts": {"passed": 25, "failed": 0, "skipped": 0},
                           "tests": [{"test": "tests.gpu.test_gpu::test_x", "outcome": "passed"}]},
            "bench_head": {"status": "ok", "shapes": {"C=1000000": _shape(1_000_000, 1.31),
                                                      "C=10000000": _shape(10_000_000, 1.42),
                                                      "C=91300000": _shape(91_300_000, 1.47, largest=True)}},
            "bench_train_device": {"status": "ok", "bf16": _train(2950.0, 3300.0), "fp16": _train(2900.0, 3310.0)},
            "synth": {"status": "ok", "images": 20000, "wall_s": 41.5, "images_per_s": 610.2, "workers": 16},
            "train_e2e": {"status": "ok", "first_run": {"steps": 200, "wall_s": 95.1, "checkpoint": "step_00000200",
                                                        "eval": {"synth_val.bin": {"accuracy": 0.871}}},
                          "resumed_run": {"steps": 250, "wall_s": 40.3}},
            "bench_train_loader": {"status": "ok", **_train(2400.0)},
            "train_deepspeed": {"status": "ok", "resumed_run": {"steps": 40, "wall_s": 22.5},
                                "first_run": {"steps": 30, "wall_s": 31.0, "checkpoint": "step_00000030"}},
        },
    }


def _block_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| figure")]
    return [[cell.strip().replace("\x00", "\\|") for cell in line.replace("\\|", "\x00").strip().strip("|").split("|")]
            for line in rows]


def test_rows_are_the_readmes() -> None:
    """The script's rows are the README's, in its order (names and goals), so a write changes only figures."""
    readme = (REPO / "README.md").read_text()
    inside = readme.split(table.BEGIN, 1)[1].split(table.END, 1)[0]
    assert [(r[0], r[1]) for r in _block_rows(inside)] == table.ROWS


def test_every_row_gets_its_figure_and_write_replaces_only_the_block(tmp_path: Path) -> None:
    doc = _gpu_doc()
    (tmp_path / "gpu_check.json").write_text(json.dumps(doc))
    readme = tmp_path / "README.md"
    original = (REPO / "README.md").read_text()
    readme.write_text(original)
    for _ in range(2):  # a second write replaces the first
        res = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "gpu_check.json"), "--write", str(readme)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
    text = readme.read_text()
    before, after = original.split(table.BEGIN)[0], original.split(table.END)[1]
    assert text.startswith(before + table.BEGIN) and text.endswith(table.END + after)
    inside = text.split(table.BEGIN)[1].split(table.END)[0]
    assert "NVIDIA H200" in inside and "580.65.06" in inside and "2027-01-05" in inside and "not yet" not in inside
    figs = [r[2] for r in _block_rows(inside)]
    assert len(figs) == len(table.ROWS) and all(figs)
    assert figs[0] == "25 passed, 0 failed, 0 skipped"
    assert figs[2].startswith("C = 10,000,000: 1.42 (step 17.5 ms, floor 12.3 ms; 61 kernels, 2 syncs")
    assert figs[3].startswith("C = 91,300,000: 1.47")
    assert figs[4] == "1.11, 1.11, 1.11" and figs[5] == "0.97, 0.97, 0.97"
    assert figs[6] == "2950 images/s (128 per step), peak 21.0 GiB, cuDNN autotuner on"
    assert figs[7] == "0.89 (floor 3300 images/s)"
    assert figs[8].startswith("2900 images/s, 0.88 of its floor") and figs[9] == "2400 images/s (data.workers = 14)"
    assert figs[10].startswith("20,000 images in 41.5 s")
    assert figs[11].startswith("200 steps in 95.1 s, eval accuracy 0.871") and "resumed to step 250" in figs[11]
    assert figs[12] == "30 steps in 31.0 s, checkpoint step_00000030; resumed to step 40 in 22.5 s"


def test_failures_read_as_failures_not_figures() -> None:
    doc = copy.deepcopy(_gpu_doc())
    st = doc["steps"]
    st["pytest_gpu"] = {"status": "failed", "error": "1 gpu test(s) failed", "counts": {"passed": 24, "failed": 1,
                        "skipped": 0}, "tests": [{"test": "tests.gpu.test_gpu::test_nccl", "outcome": "failed"}]}
    st["bench_head"]["shapes"]["C=10000000"] = {"num_classes": 10_000_000, "status": "failed",
                                                "error": "RuntimeError: CUDA out of memory"}
    st["bench_train_device"]["fp16"] = {"status": "failed", "error": "CalledProcessError: exit 1 | Killed | oom"}
    st["synth"] = {"status": "skipped", "error": "the time budget is spent"}
    del st["train_e2e"]
    st["train_deepspeed"] = {"status": "failed", "error": "StepError: deepspeed does not import"}
    figs = table.figures(doc)
    assert figs[0] == "24 passed, 1 failed, 0 skipped (failed: test_nccl)"
    assert figs[2] == "failed: RuntimeError: CUDA out of memory" and figs[4] == "1.11, failed, 1.11"
    assert figs[8] == "failed: CalledProcessError: exit 1 | Killed | oom"
    rows = _block_rows(table.block(doc))  # the "|" of an error message is escaped: every row keeps 3 cells
    assert len(rows) == len(table.ROWS) and rows[8][2] == r"failed: CalledProcessError: exit 1 \| Killed \| oom"
    assert figs[10] == "not run (the time budget is spent)" and figs[11] == "not run"
    assert figs[12] == "failed: StepError: deepspeed does not import"


@pytest.mark.parametrize("bad", ["dry", "json", "markers"])
def test_refusals_leave_the_readme_alone(tmp_path: Path, bad: str) -> None:
    doc = _gpu_doc()
    doc["dry_run"] = bad == "dry"
    src = tmp_path / "gpu_check.json"
    src.write_text("{not json" if bad == "json" else json.dumps(doc))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n" if bad == "markers" else f"a\n{table.BEGIN}\nold\n{table.END}\nb\n")
    before = readme.read_text()
    res = subprocess.run([sys.executable, str(SCRIPT), str(src), "--write", str(readme)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode != 0 and readme.read_text() == before
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert {"dry": "dry run", "json": "cannot read it as JSON", "markers": "gpu-table:begin"}[bad] in res.stderr
