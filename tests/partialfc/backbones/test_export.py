"""ONNX export (dynamic batch, checked with onnxruntime), image embedding, and the CLI commands."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import launcher.cli  # registers every command on the app
import launcher.model_files
from data_pipeline.atomic import atomic_write
from launcher.commands.groups import app
from launcher.model_files import (
    ModelPathError,
    embed_images,
    export_onnx,
    load_backbone_for_inference,
    load_image,
    resolve_weight_file,
)
from partialfc.backbones import get_backbone, save_backbone
from tests.partialfc.backbones.helpers import calibrated, float64_copy


@pytest.mark.parametrize(("name", "kwargs"), [
    ("tiny", dict(image_size=32, width=0.5)),
    ("iresnet18", dict(image_size=32, width=0.25)),
])
def test_onnx_matches_torch_and_float64_on_two_batch_sizes(tmp_path, name, kwargs):
    torch.manual_seed(0)
    model = calibrated(get_backbone(name, embedding_size=32, **kwargs), (32, 32))
    out = tmp_path / f"{name}.onnx"
    result = export_onnx(model, out, batch_sizes=(1, 5))
    assert result.exporter in {"torchscript", "dynamo"}
    assert result.batch_sizes == [1, 5]
    assert result.max_abs_output is not None and 0.5 < result.max_abs_output < 50
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4

    graph = onnx.load(str(out)).graph
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")  # symbolic: dynamic batch axis

    # independently of export_onnx's own check: onnxruntime against a float64 torch reference, at
    # batch sizes other than the traced example's
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ref_model = float64_copy(model)
    for batch in (2, 7):
        x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch)) * 2 - 1
        (got,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            ref = ref_model(x.double()).numpy()
        assert got.shape == (batch, 32)
        assert np.abs(got - ref).max() < 1e-4


def test_dynamo_exporter_is_the_fallback(tmp_path, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise RuntimeError("legacy exporter unavailable")

    monkeypatch.setattr(launcher.model_files, "_export_torchscript", refuse)
    torch.manual_seed(0)
    model = calibrated(get_backbone("tiny", embedding_size=8, image_size=16, width=0.5), (16, 16))
    result = export_onnx(model, tmp_path / "d.onnx", batch_sizes=(1, 4))
    assert result.exporter == "dynamo"
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    batch_dim = onnx.load(str(tmp_path / "d.onnx")).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param


def test_export_leaves_the_callers_model_alone(tmp_path):
    model = get_backbone("tiny", embedding_size=8, image_size=16, fp16=True)
    model = calibrated(model, (16, 16)).train().to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "m.onnx", check=False)
    assert model.training and model.fp16
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def _write_images(folder, n, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        p = folder / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def test_load_image_resizes_and_scales_to_minus_one_one(tmp_path):
    arr = np.zeros((10, 20, 3), dtype=np.uint8)
    arr[..., 0] = 255  # pure red, any size: resizing keeps it constant
    Image.fromarray(arr).save(tmp_path / "red.png")
    x = load_image(tmp_path / "red.png", (16, 8))
    assert x.shape == (3, 16, 8) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], 1.0)
    np.testing.assert_allclose(x[1:], -1.0)


def test_embed_images_is_flip_sum_l2_normalised(tmp_path):
    torch.manual_seed(0)
    model = calibrated(get_backbone("tiny", embedding_size=16, image_size=16, width=0.5), (16, 16)).train()
    paths = _write_images(tmp_path / "imgs", 5)
    emb = embed_images(model, paths, batch_size=2)
    assert model.training  # restored
    assert emb.shape == (5, 16) and emb.dtype == np.float32

    ref_model = float64_copy(model)
    x = torch.from_numpy(np.stack([load_image(p, (16, 16)) for p in paths])).double()
    with torch.no_grad():
        feats = ref_model(x) + ref_model(torch.flip(x, dims=[3]))
    ref = (feats / feats.norm(dim=1, keepdim=True)).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-5)

    # a mirrored image file has the same embedding: the flip-sum is symmetric
    mirrored = tmp_path / "mirrored.png"
    Image.open(paths[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
    np.testing.assert_allclose(embed_images(model, [mirrored])[0], emb[0], atol=1e-5)


def test_embed_names_an_unreadable_image(tmp_path):
    model = get_backbone("tiny", embedding_size=8, image_size=16)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"broken\.jpg: cannot read as an image"):
        embed_images(model, [bad])


def test_model_path_resolution(tmp_path):
    with pytest.raises(ModelPathError, match="no such file or directory"):
        resolve_weight_file(tmp_path / "missing.safetensors")
    with pytest.raises(ModelPathError, match=r"holds no checkpoint"):
        load_backbone_for_inference(tmp_path)
    # a checkpoint folder resolves to the backbone file inside it
    model = get_backbone("tiny", embedding_size=8, image_size=16)
    save_backbone(model, tmp_path / "step_5" / "backbone.safetensors", write=atomic_write)
    assert resolve_weight_file(tmp_path / "step_5") == tmp_path / "step_5" / "backbone.safetensors"
    loaded = load_backbone_for_inference(tmp_path / "step_5")
    assert not loaded.training
    assert torch.equal(loaded.fc.weight, model.fc.weight)


def test_cli_export_and_embed_round_trip(tmp_path):
    torch.manual_seed(0)
    model = calibrated(get_backbone("tiny", embedding_size=16, image_size=16, width=0.5), (16, 16))
    weights = save_backbone(model, tmp_path / "backbone.safetensors", write=atomic_write)
    runner = CliRunner()

    res = runner.invoke(app, ["export", "onnx", str(weights), str(tmp_path / "m.onnx"), "--opset", "17",
                              "--json", str(tmp_path / "export.json")])
    assert res.exit_code == 0, res.output
    assert "max abs diff" in res.output and "OK" in res.output
    report = json.loads((tmp_path / "export.json").read_text())
    assert report["ok"] and report["max_abs_diff"] < 1e-4 and report["opset"] == 17
    assert onnx.load(str(tmp_path / "m.onnx")).opset_import[0].version == 17

    images = _write_images(tmp_path / "imgs", 3)
    extra = _write_images(tmp_path / "more", 1, seed=1)
    res = runner.invoke(app, ["embed", str(weights), str(tmp_path / "imgs"), str(extra[0]),
                              "--out", str(tmp_path / "emb.bin"), "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    emb = np.load(tmp_path / "emb.bin")
    assert emb.shape == (4, 16)
    expected = embed_images(load_backbone_for_inference(weights), [*images, extra[0]])
    np.testing.assert_allclose(emb, expected, atol=1e-6)


def test_cli_errors_name_the_file(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x00" * 64)
    runner = CliRunner()
    res = runner.invoke(app, ["export", "onnx", str(bad), str(tmp_path / "m.onnx")])
    assert res.exit_code == 2
    assert "garbage.safetensors" in res.output and "safetensors" in res.output
    res = runner.invoke(app, ["embed", str(bad), str(tmp_path / "none.png"), "--out", str(tmp_path / "e.npy")])
    assert res.exit_code == 2
    assert "none.png: no such image file" in res.output
    res = runner.invoke(app, ["export", "onnx", str(tmp_path), str(tmp_path / "m.onnx")])
    assert res.exit_code == 2
    assert "holds no checkpoint" in res.output


@pytest.mark.parametrize(("opset", "says"), [
    (99, "ONNX opset 99 does not exist yet"),
    (3, "asked for ONNX opset 3, but torch's exporters could not write it (the dynamo exporter wrote opset"),
    (6, "onnxruntime cannot run this opset-6 file"),
])
def test_cli_refuses_an_opset_it_cannot_deliver(tmp_path, opset, says):
    """An opset torch's exporters do not write used to give a file of another opset reported as the one
    asked for (99 -> an opset-18 file, exit 0), or onnxruntime's traceback (6): now one line, exit 2, and
    no file left behind."""
    torch.manual_seed(0)
    weights = save_backbone(get_backbone("tiny", embedding_size=8, image_size=16, width=0.5),
                            tmp_path / "backbone.safetensors", write=atomic_write)
    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(app, ["export", "onnx", str(weights), str(out), "--opset", str(opset)])
    assert res.exit_code == 2, res.output
    assert f"pfc: {out}: {says}" in res.output and "choose another --opset" in res.output
    assert not out.exists()


@pytest.mark.parametrize(("kwargs", "says"), [
    (dict(name="tiny", image_size=(32, 48)), "a backbone built for 32x48 images"),
])
def test_eval_refuses_a_backbone_no_training_config_describes_in_one_line(tmp_path, kwargs, says):
    """Backbones the library builds but a training config cannot describe (rectangular): one line,
    exit 2 (it was the model's input-shape traceback, or pydantic's)."""
    import io
    import pickle

    blobs = []
    for shade in (10, 200):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (shade, shade, shade)).save(buf, format="JPEG")
        blobs.append(buf.getvalue())
    pairs = tmp_path / "pairs.bin"
    pairs.write_bytes(pickle.dumps((blobs * 10, [True, False] * 5)))
    name = kwargs.pop("name")
    weights = save_backbone(get_backbone(name, embedding_size=8, **kwargs), tmp_path / "b.safetensors",
                            write=atomic_write)
    res = CliRunner().invoke(app, ["eval", str(weights), "--bin", str(pairs)])
    assert res.exit_code == 2, res.output
    assert f"pfc eval: {weights}: {says}" in res.output
