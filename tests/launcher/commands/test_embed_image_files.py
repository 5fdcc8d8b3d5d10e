"""`pfc embed` on the image files users have: 16-bit grey images, and the suffixes `pfc data pack` takes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import launcher.cli  # noqa: F401  (registers every command on the app)
from data_pipeline.atomic import atomic_write
from data_pipeline.pack import list_folder
from launcher.commands.groups import app
from partialfc.backbones import get_backbone, save_backbone
from tests.partialfc.backbones.helpers import calibrated


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    model = calibrated(get_backbone("tiny", embedding_size=8, image_size=16, width=0.5), (16, 16))
    return save_backbone(model, tmp_path / "backbone.safetensors", write=atomic_write)


def _embed(weights, tmp_path, *images, out="e.npy"):
    res = CliRunner().invoke(app, ["embed", str(weights), *map(str, images), "--out", str(tmp_path / out)])
    return res, (np.load(tmp_path / out) if res.exit_code == 0 else None)


def test_16_bit_grey_images_embed_as_their_8_bit_picture(weights, tmp_path):
    """Pillow's convert("RGB") clips 16-bit grey at 255: a 16-bit PNG / TIFF / PGM face was embedded as
    an almost white square, silently."""
    grey = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey8.png")
    wide = grey.astype(np.uint16) * 257  # the same picture on 16 bits
    files = []
    for suffix in ("png", "tif", "pgm"):
        Image.fromarray(wide).save(tmp_path / f"grey16.{suffix}")
        files.append(tmp_path / f"grey16.{suffix}")
    res, emb = _embed(weights, tmp_path, tmp_path / "grey8.png", *files)
    assert res.exit_code == 0, res.output
    for row in emb[1:]:
        np.testing.assert_allclose(row, emb[0], atol=1e-6)


def test_a_float_image_is_refused_in_one_line(weights, tmp_path):
    Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32)).save(tmp_path / "depth.tif")
    res, _ = _embed(weights, tmp_path, tmp_path / "depth.tif")
    assert res.exit_code == 2
    assert f"pfc: {tmp_path / 'depth.tif'}: a floating-point image (mode F); expected an 8- or 16-bit image" in (
        res.output)


def test_a_folder_embeds_every_image_pack_would_pack(weights, tmp_path):
    """The folder walk knew fewer suffixes than `pfc data pack`: .pgm, .ppm and .gif faces were left out of
    the rows without a word."""
    rng = np.random.default_rng(0)
    faces = tmp_path / "faces"
    for person, suffixes in (("alice", ("png", "pgm")), ("bob", ("gif", "ppm", "jpg"))):
        (faces / person).mkdir(parents=True)
        for i, suffix in enumerate(suffixes):
            mode_shape = (16, 16) if suffix == "pgm" else (16, 16, 3)
            Image.fromarray(rng.integers(0, 256, mode_shape, dtype=np.uint8)).save(faces / person / f"{i}.{suffix}")
    (faces / "bob" / "notes.txt").write_text("not an image: skipped, as pack skips it")
    res, emb = _embed(weights, tmp_path, faces)
    assert res.exit_code == 0, res.output
    packed = [str(p) for _, files in list_folder(faces) for p in files]
    assert (tmp_path / "e.order.txt").read_text().splitlines() == packed
    assert emb.shape == (5, 8)


def test_pack_encodes_16_bit_grey_as_its_8_bit_picture_and_skips_a_float_image(tmp_path):
    """`pfc data pack` clipped the same way: a dataset of 16-bit faces trained on near-white squares."""
    from data_pipeline.pack import encode_image, pack_dataset

    grey = np.random.default_rng(1).integers(0, 256, (16, 16), dtype=np.uint8)
    src = tmp_path / "src" / "alice"
    src.mkdir(parents=True)
    Image.fromarray(grey).save(src / "0.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(src / "1.png")
    Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32)).save(src / "2.tif")
    eight, sixteen = (encode_image(src / f"{i}.png", size=None, quality=95)[0] for i in (0, 1))
    assert sixteen == eight
    summary = pack_dataset(tmp_path / "src", tmp_path / "train", image_size=(16, 16), progress=False)
    assert summary["images"] == 2
    assert [s["path"] for s in summary["skipped"]] == [str(src / "2.tif")]
    assert "a floating-point image (mode F)" in summary["skipped"][0]["error"]


def test_an_exif_orientation_is_applied_by_pack_and_embed(weights, tmp_path):
    """A phone photo stored sideways with an EXIF orientation: viewers and OpenCV's imread show it upright;
    pack and embed read it sideways."""
    from data_pipeline.pack import encode_image

    pixels = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "sideways.png", exif=exif)
    Image.fromarray(np.ascontiguousarray(np.rot90(pixels, -1))).save(tmp_path / "upright.png")
    assert (encode_image(tmp_path / "sideways.png", size=None, quality=95)[0]
            == encode_image(tmp_path / "upright.png", size=None, quality=95)[0])
    res, emb = _embed(weights, tmp_path, tmp_path / "sideways.png", tmp_path / "upright.png")
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(emb[0], emb[1])


# A camera's EXIF block (orientation 6) with a tag of an unexpected type: Pillow's exif_transpose raised
# struct.error rewriting it (one photo stopped a whole pack)
BAD_EXIF = bytes.fromhex(
    "4578696600004d4d002a000000080003014e00020000000600000032011200030000000100060000876900040000000100000038"
    "000000006d616b657200000190030002000000140000004a00000000323032303a30313a30312030303a30303a303000")


def test_a_malformed_exif_block_is_still_turned_upright_by_pack_and_embed(weights, tmp_path):
    from data_pipeline.pack import pack_dataset

    src = tmp_path / "src" / "alice"
    src.mkdir(parents=True)
    pixels = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(src / "camera.png", exif=BAD_EXIF)
    Image.fromarray(np.ascontiguousarray(np.rot90(pixels, -1))).save(tmp_path / "upright.png")
    summary = pack_dataset(tmp_path / "src", tmp_path / "train", image_size=(16, 16), progress=False)
    assert summary["images"] == 1 and not summary["skipped"], summary["skipped"]
    res, emb = _embed(weights, tmp_path, src / "camera.png", tmp_path / "upright.png")
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(emb[0], emb[1])


def test_evaluation_reads_a_bins_images_as_pack_and_embed_read_the_files(tmp_path):
    """`pfc data pairs FOLDER` keeps each file's bytes: the evaluation decoded them without the EXIF turn and
    the 16-bit scaling, so a model trained on upright faces was evaluated on sideways (and white) ones."""
    from launcher.model_files import load_image
    from launcher.trainer.evaluation import decode_images

    rng = np.random.default_rng(4)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "sideways.png", exif=exif)
    Image.fromarray(rng.integers(0, 256, (16, 16)).astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    files = [tmp_path / "sideways.png", tmp_path / "grey16.png"]
    seen = decode_images([f.read_bytes() for f in files], 16).numpy()
    for row, f in zip(seen, files, strict=True):
        np.testing.assert_array_equal(row, load_image(f, (16, 16)), err_msg=f.name)


def test_the_bin_checks_refuse_what_the_evaluation_cannot_read_and_measure_it_upright(tmp_path):
    """A float image in a .bin is refused by the checks before training, not mid-run by the evaluation."""
    from data_pipeline.verification import decode_check

    Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32)).save(tmp_path / "depth.tif")
    with pytest.raises(ValueError, match=r"floating-point image \(mode F\)"):
        decode_check((tmp_path / "depth.tif").read_bytes())
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((8, 16, 3), dtype=np.uint8)).save(tmp_path / "wide.png", exif=exif)
    assert decode_check((tmp_path / "wide.png").read_bytes()) == (16, 8)  # (h, w) as shown
