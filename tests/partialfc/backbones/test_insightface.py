"""insightface arcface_torch weights in and out (issue 15 item 1).

The state_dicts come from ``tests/partialfc/backbones/insightface_reference.py``: modules written here with
insightface's exact names and shapes, randomised and saved with ``torch.save`` as insightface does.
Nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

import launcher.cli  # noqa: F401  registers every command on the app
from data_pipeline.atomic import atomic_write
from launcher.commands.export import order_file
from launcher.commands.groups import app
from partialfc.backbones import (
    BackboneFileError,
    get_backbone,
    infer_config,
    load_backbone,
    load_backbone_weights,
    save_backbone,
)
from tests.partialfc.backbones.insightface_reference import (
    REF_IRESNET_LAYERS,
    RefIResNet,
    RefMobileFaceNet,
    randomise,
)

#: insightface's own builders at their published sizes (112 px, 512-d), on the meta device
PUBLISHED = [
    *[(name, lambda layers=layers: RefIResNet(layers)) for name, layers in REF_IRESNET_LAYERS.items()],
    ("mbf", lambda: RefMobileFaceNet(512, (1, 4, 6, 2), scale=2)),
    ("mbf_large", lambda: RefMobileFaceNet(512, (2, 8, 12, 4), scale=4)),
]


@pytest.mark.parametrize(("name", "make"), PUBLISHED, ids=[n for n, _ in PUBLISHED])
def test_every_published_backbone_maps_key_for_key(name, make):
    """Exact key names, order-free, and shapes of insightface's networks at 112 px, 512-d."""
    with torch.device("meta"):
        ref_state = make().state_dict()
        config = infer_config(ref_state)
        ours = get_backbone(config["name"], embedding_size=config["embedding_size"],
                            image_size=config["image_size"], width=config["width"],
                            **{k: config[k] for k in ("scale", "blocks") if k in config})
    assert config["image_size"] == 112 and config["embedding_size"] == 512 and config["width"] == 1.0
    expected_name = {"mbf": "mobilefacenet", "mbf_large": "mobilefacenet"}.get(name, name)
    assert config["name"] == expected_name
    own = ours.state_dict()
    assert set(own) == set(ref_state)
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: tuple(v.shape) for k, v in ref_state.items()}
    if name == "iresnet50":
        assert len(own) == 475  # the count a user sees in arcface_torch's r50 backbone.pth


def _pth(tmp_path, model, name="backbone.pth", **wrap):
    path = tmp_path / name
    state = model.state_dict()
    torch.save({"state_dict": state} if wrap.get("nested") else
               {f"module.{k}": v for k, v in state.items()} if wrap.get("ddp") else state, path)
    return path


SMALL = [
    # (id, reference builder, input size): small widths / sizes keep the forward passes fast
    ("iresnet18_base8_112", lambda: RefIResNet([2, 2, 2, 2], 32, base=8, image_size=112), 112),
    ("iresnet50_base4_32", lambda: RefIResNet([3, 4, 14, 3], 16, base=4, image_size=32), 32),
    ("mbf_112", lambda: RefMobileFaceNet(64, (1, 4, 6, 2), scale=2, image_size=112), 112),
    ("mbf_large_32", lambda: RefMobileFaceNet(16, (2, 8, 12, 4), scale=4, image_size=32), 32),
]


@pytest.mark.parametrize(("make", "size"), [(m, s) for _, m, s in SMALL], ids=[i for i, _, _ in SMALL])
def test_insightface_pth_loads_and_gives_identical_outputs(tmp_path, make, size):
    torch.manual_seed(0)
    ref = randomise(make())
    path = _pth(tmp_path, ref)
    ours = load_backbone(path).eval()
    x = torch.rand(3, 3, size, size) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        # the same function exactly: float64 copies agree to rounding
        ref64, ours64 = ref.double(), ours.double()
        torch.testing.assert_close(ours64(x.double()), ref64(x.double()), rtol=1e-10, atol=1e-10)
    for k, v in ref.state_dict().items():  # every tensor arrived, buffers included
        assert torch.equal(ours.state_dict()[k], v), k


def test_ddp_prefix_nested_safetensors_and_init_into_a_built_model(tmp_path):
    torch.manual_seed(0)
    ref = randomise(RefIResNet([2, 2, 2, 2], 8, base=4, image_size=32))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for flavour in ("ddp", "nested"):
        ours = load_backbone(_pth(tmp_path, ref, f"{flavour}.pth", **{flavour: True})).eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    # a safetensors conversion of their state_dict (no metadata of ours): the same network
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    ours = load_backbone(tmp_path / "r18.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    # fine-tuning path: weights into a network built from the config
    target = get_backbone("iresnet18", embedding_size=8, image_size=32, width=4 / 64)
    load_backbone_weights(target, _pth(tmp_path, ref))
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x), ref(x), rtol=0, atol=0)


def test_a_truncated_file_is_refused_in_one_line(tmp_path):
    ref = RefIResNet([2, 2, 2, 2], 8, base=4, image_size=32)
    path = _pth(tmp_path, ref, "r18.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a download cut short
    with pytest.raises(BackboneFileError) as info:
        load_backbone(path)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot read as a torch state_dict (truncated or damaged?)")
    assert "\n" not in message
    # the same line from the CLI, nothing else on stderr
    res = CliRunner().invoke(app, ["embed", str(path), str(_faces(tmp_path / "faces", 1, 1)[0]),
                                   "--out", str(tmp_path / "e.npy")])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [f"pfc: {message}"]


def test_a_file_that_fits_no_backbone_names_the_first_mismatched_key_and_shape(tmp_path):
    ref = RefIResNet([2, 2, 2, 2], 8, base=4, image_size=32)
    state = ref.state_dict()
    state["layer2.1.conv1.weight"] = torch.zeros(8, 4, 3, 3)  # expected (8, 8, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(BackboneFileError, match=r"bad\.pth: weights do not fit any backbone; closest iresnet18 "
                                                r"\(width 0\.0625, 8-d, 32 px\): key 'layer2\.1\.conv1\.weight' "
                                                r"has shape \(8, 4, 3, 3\), expected \(8, 8, 3, 3\)"):
        load_backbone(path)
    # block counts of no iresnet
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("layer4.1.")}
    torch.save(state, path)
    with pytest.raises(BackboneFileError, match=r"iresnet keys with \(2, 2, 2, 1\) blocks per stage fit no "
                                                r"backbone"):
        load_backbone(path)
    # a key no backbone has
    state = {**ref.state_dict(), "head.weight": torch.zeros(3, 8)}
    torch.save(state, path)
    with pytest.raises(BackboneFileError, match=r"key 'head\.weight' \(shape \(3, 8\)\) is not in the model"):
        load_backbone(path)
    # something else altogether
    torch.save({"encoder.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(BackboneFileError, match=r"fits no backbone: first key 'encoder\.weight' \(4, 4\)"):
        load_backbone(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(BackboneFileError, match=r"holds a list that is not a state_dict"):
        load_backbone(path)


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pth_carrying_pickled_code_is_refused_unread(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": _Payload(str(marker))}, path)
    with pytest.raises(BackboneFileError, match=r"evil\.pth: holds more than tensors .*weights_only=True"):
        load_backbone(path)
    assert not marker.exists()


def _faces(folder, identities, per_identity, size=(112, 112), seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(identities):
        d = folder / f"id{i:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_identity):
            p = d / f"{j}.jpg"
            Image.fromarray(rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)).save(p, quality=95)
            paths.append(p)
    return paths


def _insightface_embedding(ref, paths):
    """insightface's preprocessing and the usual flip-sum: RGB, (x / 255 - 0.5) / 0.5, L2-normalised."""
    out = []
    with torch.no_grad():
        for p in paths:
            rgb = np.asarray(Image.open(p).convert("RGB"), dtype=np.float64)
            x = torch.from_numpy(((rgb / 255.0 - 0.5) / 0.5).transpose(2, 0, 1).copy()).float()[None]
            feat = ref(x) + ref(torch.flip(x, dims=[3]))
            out.append(F.normalize(feat, dim=1)[0].numpy())
    return np.stack(out)


def test_cli_embed_takes_an_insightface_pth_with_no_other_option(tmp_path):
    torch.manual_seed(0)
    ref = randomise(RefIResNet([2, 2, 2, 2], 32, base=8, image_size=112))
    weights = _pth(tmp_path, ref, "r18.pth")
    paths = _faces(tmp_path / "faces", 3, 2)
    out = tmp_path / "e.npy"
    res = CliRunner().invoke(app, ["embed", str(weights), str(tmp_path / "faces"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    emb = np.load(out)
    assert emb.shape == (6, 32)
    # identity subfolders walked in sorted order, the order written beside the embeddings
    listed = order_file(out).read_text().splitlines()
    assert listed == [str(p) for p in sorted(paths)]
    np.testing.assert_allclose(emb, _insightface_embedding(ref, [tmp_path / p for p in listed]), atol=2e-5)


def test_cli_eval_takes_an_insightface_pth(tmp_path):
    from data_pipeline.verification import save_bin

    torch.manual_seed(0)
    ref = randomise(RefIResNet([2, 2, 2, 2], 16, base=4, image_size=112))
    weights = _pth(tmp_path, ref, "r18.pth")
    images = []
    for p in _faces(tmp_path / "faces", 10, 2):
        buf = io.BytesIO()
        Image.open(p).save(buf, format="JPEG")
        images.append(buf.getvalue())
    save_bin(tmp_path / "pairs.bin", images, [True, False] * 5)
    res = CliRunner().invoke(app, ["eval", str(weights), "--bin", str(tmp_path / "pairs.bin"),
                                   "--json", str(tmp_path / "eval.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["model"] == str(weights) and 0.0 <= report["pairs.bin"]["accuracy"] <= 1.0


@pytest.mark.parametrize(("name", "kwargs", "ref_make"), [
    ("iresnet18", dict(embedding_size=16, image_size=32, width=4 / 64),
     lambda: RefIResNet([2, 2, 2, 2], 16, base=4, image_size=32)),
    ("mobilefacenet", dict(embedding_size=16, image_size=32, scale=2),
     lambda: RefMobileFaceNet(16, (1, 4, 6, 2), scale=2, image_size=32)),
])
def test_cli_export_torch_writes_what_insightface_loads(tmp_path, name, kwargs, ref_make):
    torch.manual_seed(0)
    ours = randomise(get_backbone(name, **kwargs))
    weights = save_backbone(ours, tmp_path / "backbone.safetensors", write=atomic_write)
    out = tmp_path / "out.pth"
    res = CliRunner().invoke(app, ["export", "torch", str(weights), str(out)])
    assert res.exit_code == 0, res.output
    assert "insightface" in res.output
    state = torch.load(out, weights_only=True)
    ref = ref_make()
    ref.load_state_dict(state, strict=True)  # what arcface_torch's code does with a backbone.pth
    ref.eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ref(x), ours.eval()(x), rtol=1e-5, atol=1e-5)
    # and back in: the exported file loads as an insightface file
    assert load_backbone(out).backbone_config["name"] == name


def test_export_torch_refuses_a_backbone_insightface_lacks(tmp_path):
    weights = save_backbone(get_backbone("tiny", embedding_size=8, image_size=16), tmp_path / "t.safetensors",
                            write=atomic_write)
    res = CliRunner().invoke(app, ["export", "torch", str(weights), str(tmp_path / "t.pth")])
    assert res.exit_code == 2
    assert "backbone 'tiny' has no insightface arcface_torch counterpart" in res.output
    assert not (tmp_path / "t.pth").exists()
