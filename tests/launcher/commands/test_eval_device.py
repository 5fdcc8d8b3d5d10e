"""``pfc eval --device``: ``auto`` (the default: CUDA where torch sees a device, else the CPU), ``cpu``,
``cuda``, ``cuda:N``. The device used is in the output and in the JSON's ``device``; a device the machine
lacks and a value that names no device are refused in one line naming ``--device``.
(tests/gpu/test_eval_cuda.py runs ``--device cuda`` against the CPU on a GPU.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from launcher.cli import app

SIDE = 16


@pytest.fixture(scope="module")
def model_and_bin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a tiny backbone file, a tiny verification .bin of its image size)."""
    from data_pipeline.atomic import atomic_write
    from data_pipeline.synth import default_val_bin, generate
    from partialfc.backbones import get_backbone, save_backbone
    from tests.partialfc.backbones.helpers import calibrated

    root = tmp_path_factory.mktemp("eval_device")
    generate(root / "train", 2, 1, image_size=SIDE, val_identities=6, val_pairs=20, seed=1, workers=1)
    torch.manual_seed(0)
    net = calibrated(get_backbone("tiny", embedding_size=8, image_size=SIDE, width=0.5), (SIDE, SIDE))
    return save_backbone(net, root / "backbone.safetensors", write=atomic_write), default_val_bin(root / "train")


def _eval(model_and_bin: tuple[Path, Path], out: Path, *device: str) -> dict[str, object]:
    weights, val_bin = model_and_bin
    args = ["eval", str(weights), "--bin", str(val_bin), "--json", str(out)]
    res = CliRunner().invoke(app, args + (["--device", *device] if device else []))
    assert res.exit_code == 0, res.output
    payload: dict[str, object] = json.loads(out.read_text())
    assert f"device: {payload['device']}" in res.output
    return payload


def _refused(model_and_bin: tuple[Path, Path], device: str) -> str:
    """The one line `pfc eval --device DEVICE` ends with: exit 2, no traceback, nothing else printed."""
    weights, val_bin = model_and_bin
    res = CliRunner().invoke(app, ["eval", str(weights), "--bin", str(val_bin), "--device", device])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit), res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("pfc eval: --device "), lines[0]
    return lines[0]


def test_cpu_is_the_default_on_a_cpu_machine_and_is_recorded(model_and_bin: tuple[Path, Path],
                                                              tmp_path: Path) -> None:
    """``--device cpu``: the same metrics as the default (the CPU where there is no CUDA), and ``"cpu"`` in
    the JSON; the default records the device ``auto`` chose."""
    name = model_and_bin[1].name
    chosen = _eval(model_and_bin, tmp_path / "cpu.json", "cpu")
    default = _eval(model_and_bin, tmp_path / "auto.json")
    assert chosen["device"] == "cpu"
    assert default["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert chosen[name] == default[name]


def test_cuda_without_cuda_is_refused_in_one_line(model_and_bin: tuple[Path, Path]) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: --device cuda is a valid choice (tests/gpu/test_eval_cuda.py)")
    for device in ("cuda", "cuda:0"):
        line = _refused(model_and_bin, device)
        assert "no CUDA device" in line and "--device cpu" in line, line


def test_cuda_index_beyond_the_visible_devices_is_refused(model_and_bin: tuple[Path, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``cuda:N`` with N at or past the count of visible devices (two pretended here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    line = _refused(model_and_bin, "cuda:2")
    assert "no such CUDA device (2 visible: cuda:0 to cuda:1)" in line, line


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "cuda:-1", "CUDA 0", ""])
def test_a_value_that_names_no_device_is_refused(model_and_bin: tuple[Path, Path], device: str) -> None:
    line = _refused(model_and_bin, device)
    assert line == f"pfc eval: --device {device!r}: expected auto, cpu, cuda or cuda:N", line
