"""``pfc eval --device cuda``: the backbone embeds the verification pairs and the held-out set on the GPU, the
JSON records that device, and the metrics agree with ``--device cpu`` (up to the GPU's float rounding, which
can move a pair across a fold's threshold). Under the CPU stand-in (``PFC_GPU_TESTS_ON_CPU=1``) both runs are
on the CPU and the test only keeps its code alive. The refusals of ``--device`` are in
tests/launcher/commands/test_eval_device.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from launcher.cli import app

pytestmark = pytest.mark.gpu

SIDE = 16


def test_eval_on_the_gpu_matches_the_cpu(dev: torch.device, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import partialfc.backbones as backbones
    from data_pipeline.atomic import atomic_write
    from data_pipeline.synth import default_val_bin, generate
    from partialfc.backbones import get_backbone, save_backbone
    from tests.partialfc.backbones.helpers import calibrated

    prefix = tmp_path / "train"
    generate(prefix, 6, 3, image_size=SIDE, val_identities=10, val_pairs=60, seed=1, workers=1)
    val_bin = default_val_bin(prefix)
    torch.manual_seed(0)
    net = calibrated(get_backbone("tiny", embedding_size=8, image_size=SIDE, width=0.5), (SIDE, SIDE))
    weights = save_backbone(net, tmp_path / "backbone.safetensors", write=atomic_write)

    seen: list[torch.device] = []
    load = backbones.load_backbone

    def watched_load(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        model = load(*args, **kwargs)  # type: ignore[arg-type]
        model.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].device))
        return model

    monkeypatch.setattr(backbones, "load_backbone", watched_load)
    payloads, devices = {}, {}
    for device in (str(dev), "cpu"):
        out = tmp_path / f"{device}.json"
        seen.clear()
        res = CliRunner().invoke(app, ["eval", str(weights), "--bin", str(val_bin), "--heldout", str(prefix),
                                       "--device", device, "--json", str(out)])
        assert res.exit_code == 0, res.output
        payloads[device], devices[device] = json.loads(out.read_text()), set(seen)
    gpu, cpu = payloads[str(dev)], payloads["cpu"]
    assert gpu["device"] == str(dev) and cpu["device"] == "cpu"
    assert devices[str(dev)] == {dev} and devices["cpu"] == {torch.device("cpu")}, devices
    name = val_bin.name
    assert gpu[name]["accuracy"] == pytest.approx(cpu[name]["accuracy"], abs=0.05)
    assert gpu[name]["auc"] == pytest.approx(cpu[name]["auc"], abs=0.02)
    disc_gpu, disc_cpu = gpu["heldout_discrepancy"], cpu["heldout_discrepancy"]
    assert disc_gpu["num_classes"] == disc_cpu["num_classes"] == 6
    assert disc_gpu["directional_deg"] == pytest.approx(disc_cpu["directional_deg"], rel=1e-2, abs=1e-2)
