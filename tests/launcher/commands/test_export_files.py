"""What `pfc export torch` and `pfc export onnx` write and say, for backbones and sizes next to the defaults."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import launcher.cli  # noqa: F401  (registers every command on the app)
from data_pipeline.atomic import atomic_write
from launcher.commands.groups import app
from partialfc.backbones import get_backbone, load_backbone, read_backbone_config, save_backbone
from tests.partialfc.backbones.helpers import calibrated


@pytest.mark.parametrize(("name", "kwargs", "shapes_say"), [
    # 96 px is a 10 x 10 grid of 9-px patches, as 90 px is: the .pth's shapes said 90
    ("vit_t", dict(image_size=96, width=0.125), 90),
    # 16 x 4 cells of the last feature map are 64, as 8 x 8 are: the .pth's shapes said 128 x 128
    ("iresnet18", dict(image_size=(256, 64), width=0.125), 128),
])
def test_exported_pth_reads_back_as_the_same_network(tmp_path, name, kwargs, shapes_say):
    """A .pth from `pfc export torch` was read back (pfc eval / embed, checkpoint.init_backbone) as a network
    for another image size whenever the shapes allow two: same weights, other input, silently other
    embeddings. It carries its config now, and still loads into insightface's modules as it is."""
    torch.manual_seed(0)
    size = kwargs["image_size"]
    hw = size if isinstance(size, tuple) else (size, size)
    model = calibrated(get_backbone(name, embedding_size=16, **kwargs), hw)
    weights = save_backbone(model, tmp_path / "backbone.safetensors", write=atomic_write)
    pth = tmp_path / "exported.pth"
    res = CliRunner().invoke(app, ["export", "torch", str(weights), str(pth)])
    assert res.exit_code == 0, res.output

    # what a reader of the shapes alone (an insightface .pth) infers: the ambiguity this is about
    state = torch.load(pth, weights_only=True)
    from partialfc.backbones.arcface_weights import infer_config
    assert infer_config(state)["image_size"] == shapes_say

    assert read_backbone_config(pth)["image_size"] == size
    faces = tmp_path / "faces"
    faces.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (120, 100, 3), dtype=np.uint8)).save(faces / f"{i}.png")
    runner = CliRunner()
    for model_file, out in ((weights, "from_safetensors.npy"), (pth, "from_pth.npy")):
        res = runner.invoke(app, ["embed", str(model_file), str(faces), "--out", str(tmp_path / out)])
        assert res.exit_code == 0, res.output
    np.testing.assert_allclose(np.load(tmp_path / "from_pth.npy"), np.load(tmp_path / "from_safetensors.npy"),
                               atol=1e-6)

    # their side: a module with the same names takes the file with a strict load_state_dict
    theirs = get_backbone(name, embedding_size=16, **kwargs)
    theirs.load_state_dict(state, strict=True)
    assert torch.equal(theirs.state_dict()[next(iter(state))], state[next(iter(state))])


def test_a_pth_without_our_config_is_still_read_off_its_shapes(tmp_path):
    """insightface's own backbone.pth (a plain state_dict, its modules' versions in _metadata) loads as before."""
    torch.manual_seed(0)
    model = get_backbone("vit_t", embedding_size=16, image_size=112, width=0.125)
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    loaded = load_backbone(tmp_path / "backbone.pth")
    assert loaded.backbone_config["image_size"] == 112 and loaded.backbone_config["name"] == "vit_t"


def test_export_onnx_says_the_input_is_rgb_scaled_to_minus_one_one(tmp_path):
    """A BGR / [0, 255] input is accepted by the graph and silently wrong: the export says what it takes."""
    torch.manual_seed(0)
    weights = save_backbone(get_backbone("tiny", embedding_size=8, image_size=(16, 24), width=0.5),
                            tmp_path / "backbone.safetensors", write=atomic_write)
    res = CliRunner().invoke(app, ["export", "onnx", str(weights), str(tmp_path / "m.onnx")])
    assert res.exit_code == 0, res.output
    assert "(batch, 3, 16, 24) float32, RGB (not BGR), (pixel / 255 - 0.5) / 0.5 in [-1, 1]" in res.output
    assert "not L2-normalised" in res.output


def test_export_torch_of_a_vit_at_108_px_says_to_build_it_at_108(tmp_path):
    """108 px is the 12 x 12 tokens of insightface's 112-px ViTs: get_model("vit_t") takes the weights and is fed
    112-px images. The note said their code "builds its FC / GDC for 112 x 112 only", which a ViT has not."""
    torch.manual_seed(0)
    weights = save_backbone(get_backbone("vit_t", embedding_size=8, image_size=108, width=0.125),
                            tmp_path / "backbone.safetensors", write=atomic_write)
    res = CliRunner().invoke(app, ["export", "torch", str(weights), str(tmp_path / "v.pth")])
    assert res.exit_code == 0, res.output
    assert ("image size 108: insightface's get_model builds its ViTs for 112 px; build their "
            "VisionTransformer(img_size=108, patch_size=9, ...) instead") in res.output
    assert "FC / GDC" not in res.output
