"""`pfc export onnx`'s check is relative to the embeddings' length: an absolute 1e-4 on embeddings of
magnitude ~1e-2 (an untrained tiny or MobileFaceNet, or any backbone whose last BatchNorm1d is small) let a
0.5% error of the exported graph through."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import launcher.cli  # registers every command on the app
import launcher.model_files
from data_pipeline.atomic import atomic_write
from launcher.commands.groups import app
from launcher.model_files import compare_onnx, export_onnx
from partialfc.backbones import get_backbone, save_backbone
from tests.partialfc.backbones.helpers import calibrated

pytest.importorskip("onnxruntime")

SIDE = 16
ERROR = 0.005  # the relative error the wrong graph makes on half the embedding channels


def _small_output_model() -> torch.nn.Module:
    """A tiny backbone whose embeddings are ~1e-2 long per element, as a fresh MobileFaceNet's or tiny's are."""
    torch.manual_seed(0)
    net = calibrated(get_backbone("tiny", embedding_size=16, image_size=SIDE, width=0.5), (SIDE, SIDE))
    with torch.no_grad():
        net.features.weight.mul_(0.005)
        net.features.bias.mul_(0.005)
    return net


def _wrong(net: torch.nn.Module) -> torch.nn.Module:
    """The same network with half its output channels 0.5% too large: a graph no one should ship."""
    bad = copy.deepcopy(net)
    with torch.no_grad():
        half = bad.features.weight.shape[0] // 2
        bad.features.weight[:half] *= 1 + ERROR
        bad.features.bias[:half] *= 1 + ERROR
    return bad


def _float64_relative_error(net: torch.nn.Module, onnx_path: Path) -> float:
    """Reference: max ||onnxruntime - torch float64|| / ||torch float64|| over random inputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = copy.deepcopy(net).double().eval()
    x = torch.rand(6, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        want = ref(x.double()).numpy()
    return float((np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)).max())


def test_a_half_percent_wrong_graph_fails_the_check_an_absolute_one_passed(tmp_path: Path) -> None:
    net = _small_output_model()
    good = export_onnx(net, tmp_path / "good.onnx", batch_sizes=(1, 3))
    assert good.max_abs_output is not None and good.max_abs_output < 0.1   # the small scale this is about
    assert good.max_rel_diff is not None and good.max_rel_diff < 1e-5      # a right export: ~1e-6
    assert _float64_relative_error(net, tmp_path / "good.onnx") < 1e-5

    export_onnx(_wrong(net), tmp_path / "bad.onnx", check=False)
    abs_diff, _scale, rel = compare_onnx(net, tmp_path / "bad.onnx", batch_sizes=(1, 3))
    reference = _float64_relative_error(net, tmp_path / "bad.onnx")
    assert abs_diff < 1e-4          # the old check (absolute, default 1e-4) passed this graph
    assert rel == pytest.approx(reference, rel=0.2) and rel > 1e-3   # ~ERROR / sqrt(2): caught


def test_the_cli_exits_1_for_a_wrong_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The exporter writing a subtly wrong graph (here: of a network 0.5% off on half its outputs) makes
    `pfc export onnx` exit 1 at the default tolerance, and the JSON says by how much."""
    net = _small_output_model()
    weights = save_backbone(net, tmp_path / "backbone.safetensors", write=atomic_write)
    ok = CliRunner().invoke(app, ["export", "onnx", str(weights), str(tmp_path / "ok.onnx"),
                                  "--json", str(tmp_path / "ok.json")])
    assert ok.exit_code == 0 and "(relative): OK" in ok.output, ok.output

    real = launcher.model_files._export_torchscript

    def miswriting(model: torch.nn.Module, *args: object) -> None:
        real(_wrong(model), *args)  # type: ignore[arg-type]

    monkeypatch.setattr(launcher.model_files, "_export_torchscript", miswriting)
    bad = CliRunner().invoke(app, ["export", "onnx", str(weights), str(tmp_path / "bad.onnx"),
                                   "--json", str(tmp_path / "bad.json")])
    assert bad.exit_code == 1 and "EXCEEDED" in bad.output, bad.output
    report = json.loads((tmp_path / "bad.json").read_text())
    assert not report["ok"] and report["max_rel_diff"] > 1e-3 and report["max_abs_diff"] < 1e-4
