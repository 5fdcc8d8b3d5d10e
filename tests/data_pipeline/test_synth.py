"""The synthetic identity dataset: layout, determinism, learnability proxy, verification set, CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import launcher.commands.data  # noqa: F401  (registers `pfc data synth`)
from data_pipeline.insightface import InsightFaceReader, read_property
from data_pipeline.synth import default_val_bin, generate, identity_images
from data_pipeline.verification import load_bin
from launcher.commands.groups import app


def _decode(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


def test_identity_images_deterministic_and_jittered() -> None:
    a = identity_images(seed=4, identity=9, count=3, size=32)
    assert a == identity_images(seed=4, identity=9, count=3, size=32)
    assert a != identity_images(seed=5, identity=9, count=3, size=32)
    assert a != identity_images(seed=4, identity=10, count=3, size=32)
    imgs = [_decode(b) for b in a]
    assert all(im.shape == (32, 32, 3) for im in imgs)
    # images of one identity are different pictures, not copies
    assert np.abs(imgs[0].astype(int) - imgs[1].astype(int)).mean() > 3.0


def test_learnability_proxy() -> None:
    """Same-identity images are closer than different-identity ones (8x8 pixel space), but far from
    identical: a 1-nearest-neighbour classifier is well above chance yet not perfect."""
    ids, k = 20, 5
    feats = []
    for i in range(ids):
        for b in identity_images(seed=3, identity=i, count=k, size=32):
            im = Image.open(io.BytesIO(b)).convert("RGB").resize((8, 8), Image.Resampling.BILINEAR)
            feats.append(np.asarray(im, dtype=np.float64).ravel())
    x = np.array(feats)
    y = np.repeat(np.arange(ids), k)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    same = (y[:, None] == y[None]) & ~np.eye(len(y), dtype=bool)
    diff = y[:, None] != y[None]
    assert d[same].mean() < 0.8 * d[diff].mean()
    assert d[same].min() > 0.1 * d[diff].mean()
    nn = y[(d + np.eye(len(y)) * 1e12).argmin(1)]
    acc = float((nn == y).mean())
    assert 0.4 < acc < 0.98, acc


def test_generate_layout_workers_independent_and_val_bin(tmp_path: Path) -> None:
    p1 = tmp_path / "a" / "train"
    rep = generate(p1, 6, 3, image_size=24, val_identities=4, val_pairs=10, seed=2, workers=1)
    p2 = tmp_path / "b" / "train"
    generate(p2, 6, 3, image_size=24, val_identities=4, val_pairs=10, seed=2, workers=2)
    assert Path(f"{p1}.rec").read_bytes() == Path(f"{p2}.rec").read_bytes()
    assert Path(f"{p1}.idx").read_bytes() == Path(f"{p2}.idx").read_bytes()
    assert read_property(p1) == (6, 24, 24)
    assert (tmp_path / "a" / "property").is_file()
    assert rep.images == 18 and rep.identities == 6
    r = InsightFaceReader(p1)
    assert r.labels.tolist() == np.repeat(np.arange(6), 3).tolist()
    train_payloads = {r.read_image(k)[1] for k in r.image_keys}
    assert all(_decode(p).shape == (24, 24, 3) for p in train_payloads)

    assert rep.val_bin == str(default_val_bin(p1)) == str(tmp_path / "a" / "synth_val.bin")
    images, issame = load_bin(rep.val_bin)
    assert len(images) == 20 and len(issame) == 10 and int(np.sum(issame)) == 5
    assert not set(images) & train_payloads          # unseen identities only
    assert Path(rep.val_bin).read_bytes() == (tmp_path / "b" / "synth_val.bin").read_bytes()
    for j, same in enumerate(issame):
        a, b = images[2 * j], images[2 * j + 1]
        assert a != b and _decode(a).shape == (24, 24, 3)
        if same:   # a genuine pair is two views of one identity: both are in that identity's images
            assert any({a, b} <= set(identity_images(2, 6 + v, 3, 24)) for v in range(4))


def test_generate_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one identity"):
        generate(tmp_path / "x", 0, 3, workers=1)
    with pytest.raises(ValueError, match="8 pixels"):
        generate(tmp_path / "y", 2, 2, image_size=4, val_identities=0, workers=1)
    with pytest.raises(ValueError, match="at least 2 identities and 2 pairs"):
        generate(tmp_path / "z", 2, 1, image_size=16, val_identities=1, val_pairs=4, workers=1)
    assert not list(tmp_path.iterdir())        # nothing written before the arguments are checked


def test_cli_synth_json(tmp_path: Path) -> None:
    out = tmp_path / "ds" / "faces"
    res = CliRunner().invoke(app, ["data", "synth", str(out), "--identities", "3", "--images-per-identity", "2",
                                   "--image-size", "16", "--val-identities", "2", "--val-pairs", "4",
                                   "--workers", "1", "--no-progress", "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    assert "wrote 6 images of 3 identities" in res.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["images"] == 6 and summary["val_pairs"] == 4
    assert Path(summary["val_bin"]) == tmp_path / "ds" / "faces_val.bin"
    assert read_property(out) == (3, 16, 16)
    assert Path(f"{out}.property").is_file()
