"""Backbone weight files (safetensors + JSON config in the metadata): round trip and bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from data_pipeline.atomic import atomic_write
from partialfc.backbones import (
    METADATA_KEY,
    BackboneFileError,
    get_backbone,
    load_backbone,
    load_backbone_weights,
    read_backbone_config,
    save_backbone,
)
from tests.partialfc.backbones.helpers import calibrated


@pytest.mark.parametrize(("name", "kwargs"), [
    ("iresnet18", dict(image_size=(48, 32), width=0.125)),
    ("mobilefacenet", dict(image_size=32, width=0.25)),
    ("tiny", dict(image_size=24, width=0.5)),
])
def test_round_trip_restores_architecture_and_identical_weights(tmp_path, name, kwargs):
    torch.manual_seed(0)
    model = get_backbone(name, embedding_size=12, **kwargs)
    h, w = model.image_size
    model = calibrated(model, (h, w))  # non-default BN running statistics must travel too
    path = save_backbone(model, tmp_path / "sub" / "backbone.safetensors", write=atomic_write)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))

    loaded = load_backbone(path)
    assert type(loaded) is type(model)
    assert loaded.image_size == (h, w) and loaded.embedding_size == 12
    assert read_backbone_config(path) == {"name": name, "embedding_size": 12, "image_size": model.image_size
                                          if h != w else h, "width": float(kwargs["width"])}
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    for key in ref:
        assert ref[key].dtype == got[key].dtype, key
        assert torch.equal(ref[key], got[key]), key
    x = torch.rand(2, 3, h, w) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(x), loaded.eval()(x))


def test_channels_last_and_wrapped_models_save_plain_keys(tmp_path):
    model = get_backbone("tiny", embedding_size=8, image_size=16).to(memory_format=torch.channels_last)

    class Wrapper(nn.Module):  # the shape of DDP / DeepSpeed engines: the real model under .module
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    path = save_backbone(Wrapper(model), tmp_path / "b.safetensors", config=model.backbone_config, write=atomic_write)
    loaded = load_backbone(path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


def test_extra_config_keys_are_kept(tmp_path):
    model = get_backbone("tiny", embedding_size=8, image_size=16)
    path = save_backbone(model, tmp_path / "b.safetensors", config={**model.backbone_config, "step": 42},
                         write=atomic_write)
    assert read_backbone_config(path)["step"] == 42
    assert load_backbone(path).backbone_config["step"] == 42


def test_load_weights_into_an_existing_model_for_fine_tuning(tmp_path):
    torch.manual_seed(0)
    src = get_backbone("tiny", embedding_size=8, image_size=16)
    path = save_backbone(src, tmp_path / "b.safetensors", write=atomic_write)
    torch.manual_seed(1)
    dst = get_backbone("tiny", embedding_size=8, image_size=16)
    assert not torch.equal(dst.fc.weight, src.fc.weight)
    load_backbone_weights(dst, path)
    assert torch.equal(dst.fc.weight, src.fc.weight)


def test_missing_file(tmp_path):
    with pytest.raises(BackboneFileError, match=r"nope\.safetensors: no such file"):
        load_backbone(tmp_path / "nope.safetensors")


def test_not_a_weight_file(tmp_path):
    bad = tmp_path / "model.pth"
    bad.write_bytes(b"\x80\x04this is a damaged pickle, not a state_dict" * 4)
    with pytest.raises(BackboneFileError, match=r"model\.pth: cannot read as a torch state_dict") as info:
        load_backbone(bad)
    assert info.value.path == bad
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, these are not weights\n" * 4)
    with pytest.raises(BackboneFileError, match=r"notes\.safetensors: neither a torch state_dict \(\.pth\) nor a "
                                                r"readable safetensors file"):
        load_backbone(text)


def test_safetensors_without_backbone_metadata(tmp_path):
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    # without our metadata the keys must be insightface's; these are not
    with pytest.raises(BackboneFileError, match=r"bare\.safetensors: fits no backbone: first key 'w' \(2,\)"):
        load_backbone(bare)


@pytest.mark.parametrize(("config", "expected"), [
    ("{not json", "not valid JSON"),
    (json.dumps([1, 2]), "must be a JSON object"),
    (json.dumps({"name": "tiny", "embedding_size": 8, "image_size": 16}), r"lacks \['width'\]"),
    (json.dumps({"name": "vgg", "embedding_size": 8, "image_size": 16, "width": 1.0}), "field 'name' is 'vgg'"),
    (json.dumps({"name": "tiny", "embedding_size": 8, "image_size": 20, "width": 1.0}), "divisible by 8"),
])
def test_bad_config_in_metadata(tmp_path, config, expected):
    path = tmp_path / "b.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={METADATA_KEY: config})
    with pytest.raises(BackboneFileError, match=expected):
        load_backbone(path)


def test_weights_that_do_not_fit_the_config(tmp_path):
    small = get_backbone("tiny", embedding_size=8, image_size=16, width=0.5)
    path = save_backbone(small, tmp_path / "b.safetensors",
                         config={**small.backbone_config, "width": 1.0}, write=atomic_write)  # lies about the width
    with pytest.raises(BackboneFileError, match=r"key 'stem\.0\.weight' has shape \(8, 3, 3, 3\), expected "
                                                r"\(16, 3, 3, 3\)"):
        load_backbone(path)
    other = get_backbone("iresnet18", embedding_size=8, image_size=16, width=0.125)
    with pytest.raises(BackboneFileError, match=r"weights do not fit the model iresnet18 \(width 0\.125, 8-d, 16 px\): "
                                                r"key 'conv1\.weight' \(shape \(8, 3, 3, 3\)\) is missing"):
        load_backbone_weights(other, path)


def test_save_needs_a_config():
    with pytest.raises(ValueError, match="no config given"):
        save_backbone(nn.Linear(2, 2), "unused.safetensors", write=atomic_write)


def test_mobilefacenet_files_of_the_earlier_layout_still_load(tmp_path):
    """Its parameter names became insightface's; weight files and checkpoints written before load."""
    from tests.partialfc.backbones.insightface_reference import randomise
    from tests.partialfc.backbones.legacy_mobilefacenet import LegacyMobileFaceNet

    torch.manual_seed(0)
    old = randomise(LegacyMobileFaceNet(embedding_size=12, image_size=32, width=0.3))  # odd width: rounding
    config = {"name": "mobilefacenet", "embedding_size": 12, "image_size": 32, "width": 0.3}
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(path),
              metadata={METADATA_KEY: json.dumps(config), "format": "pt"})
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loaded = load_backbone(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), old(x), rtol=0, atol=0)
    # a resumed run's plain load_state_dict (strict) takes the old names too
    fresh = get_backbone("mobilefacenet", embedding_size=12, image_size=32, width=0.3)
    fresh.load_state_dict(old.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), old(x), rtol=0, atol=0)


def test_a_safetensors_file_that_starts_with_pickles_byte_loads_with_its_config(tmp_path):
    """A safetensors header of length 128 mod 256 makes the file's first byte 0x80, pickle's PROTO: it was
    taken for a torch pickle and read without its metadata (no config: 'fits no backbone'). A legacy
    (non-zip) torch.save file still reads as torch's."""
    torch.manual_seed(0)
    net = get_backbone("tiny", embedding_size=8, image_size=16)
    path = tmp_path / "b.safetensors"
    for pad in range(256):  # the config's extra keys are kept: pad the header to each length mod 256
        save_backbone(net, path, config={**net.backbone_config, "note": "x" * pad}, write=atomic_write)
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length of 128 mod 256")
    loaded = load_backbone(path)
    assert read_backbone_config(path)["note"] == "x" * pad
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values(),
                                                 strict=True))
    legacy = tmp_path / "legacy.pth"
    torch.save(net.state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert legacy.read_bytes()[0] == 0x80
    torch.manual_seed(1)
    fresh = load_backbone_weights(get_backbone("tiny", embedding_size=8, image_size=16), legacy)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), fresh.state_dict().values(),
                                                 strict=True))
