"""`pfc bench data`: both loaders measured against their decode ceilings, JSON written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import launcher.commands.benchmarks  # noqa: F401  (registers `pfc bench data`)
from data_pipeline.dali_iterator import dali_available
from data_pipeline.decode_ceiling import pil_ceiling, sample_jpegs
from data_pipeline.insightface import InsightFaceReader
from launcher.commands.groups import app


def _run(prefix: Path, tmp_path: Path, loader: str) -> dict[str, object]:
    out = tmp_path / f"{loader}.json"
    res = CliRunner().invoke(app, ["bench", "data", str(prefix), "--loader", loader, "--threads", "1",
                                   "--batch", "8", "--seconds", "0.3", "--rounds", "1",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "decode ceiling" in res.output and "ratio" in res.output
    data = json.loads(out.read_text())
    assert data["images_per_s"] > 0 and data["decode_ceiling_images_per_s"] > 0
    assert data["ratio"] == pytest.approx(data["images_per_s"] / data["decode_ceiling_images_per_s"])
    assert data["images"] >= 8 and data["loader"] == loader
    return data


def test_bench_torch(small_dataset: Path, tmp_path: Path) -> None:
    _run(small_dataset, tmp_path, "torch")


@pytest.mark.dali
@pytest.mark.skipif(not dali_available(), reason="nvidia.dali cannot be imported (install the 'dali' extra)")
def test_bench_dali(small_dataset: Path, tmp_path: Path) -> None:
    _run(small_dataset.parent, tmp_path, "dali")      # a folder holding train.rec is accepted too


def test_pil_ceiling_counts_decodes(small_dataset: Path) -> None:
    jpegs = sample_jpegs(InsightFaceReader(small_dataset), 16)
    assert len(jpegs) == 16 and len(set(jpegs)) == 16
    n, wall = pil_ceiling(jpegs, 0, 0.2)
    assert n > 0 and n % 16 == 0 and wall >= 0.2


def test_bench_rejects_unknown_loader(small_dataset: Path) -> None:
    res = CliRunner().invoke(app, ["bench", "data", str(small_dataset), "--loader", "mxnet"])
    assert res.exit_code != 0


def test_modules_import_without_dali() -> None:
    """The DALI modules import nvidia.dali only when a DALI loader or pipeline is built."""
    import subprocess
    import sys

    code = ("import sys; import data_pipeline.dali_iterator, data_pipeline.dali_pipeline, data_pipeline.loader_bench, "
            "data_pipeline.decode_ceiling, data_pipeline.scale_bench, data_pipeline.dataset, data_pipeline.synth; "
            "assert 'nvidia.dali' not in sys.modules, 'imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
