"""`pfc data pack|inspect|pairs` through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

import launcher.cli  # noqa: F401  (registers every command)
from data_pipeline.insightface import InsightFaceReader
from data_pipeline.recordio import RecordReader
from data_pipeline.verification import load_bin
from launcher.commands.groups import app
from tests.data_pipeline.helpers import make_image_folder

runner = CliRunner()


def test_pack_inspect_pairs(tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "imgs", n_ids=4, per_id=3, size=(40, 30))
    prefix = tmp_path / "out" / "train"
    res = runner.invoke(app, ["data", "pack", str(src), str(prefix), "--no-progress",
                              "--json", str(tmp_path / "pack.json")])
    assert res.exit_code == 0, res.output
    assert "packed 12 images of 4 identities" in res.output
    summary = json.loads((tmp_path / "pack.json").read_text())
    assert summary["images"] == 12 and summary["image_size"] == [112, 112]
    assert (tmp_path / "out" / "property").read_text() == "4,112,112\n"
    assert InsightFaceReader(prefix).labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]

    res = runner.invoke(app, ["data", "inspect", str(prefix), "--deep", "--json", str(tmp_path / "i.json")])
    assert res.exit_code == 0, res.output
    assert "images      12" in res.output and "status      OK" in res.output
    report = json.loads((tmp_path / "i.json").read_text())
    assert report["ok"] and report["decoded"] == 12 and report["identities"] == 4

    res = runner.invoke(app, ["data", "pairs", str(prefix), str(tmp_path / "v.bin"), "--pairs", "10",
                              "--seed", "1", "--json", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    assert "wrote 10 pairs (5 genuine, 5 impostor)" in res.output
    images, issame = load_bin(tmp_path / "v.bin")
    assert len(images) == 20 and issame.sum() == 5
    assert json.loads((tmp_path / "p.json").read_text())["pairs"] == 10


def test_inspect_fails_on_corruption(tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "imgs", n_ids=2, per_id=2, size=(20, 20))
    prefix = tmp_path / "ds"
    assert runner.invoke(app, ["data", "pack", str(src), str(prefix), "--no-progress"]).exit_code == 0
    rec = Path(f"{prefix}.rec")
    off = RecordReader(rec, f"{prefix}.idx").offset(3)
    data = bytearray(rec.read_bytes())
    data[off] ^= 0x01
    rec.write_bytes(bytes(data))
    res = runner.invoke(app, ["data", "inspect", str(prefix), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 1
    assert "CORRUPT     1 records" in res.output
    assert f"key 3 at byte offset {off}" in res.output and "bad magic" in res.output
    assert json.loads((tmp_path / "r.json").read_text())["corrupt"][0]["offset"] == off


def test_pack_and_pairs_report_bad_sources(tmp_path: Path) -> None:
    res = runner.invoke(app, ["data", "pack", str(tmp_path / "nothing"), str(tmp_path / "o"),
                              "--no-progress"])
    assert res.exit_code == 2 and "expected a folder" in res.output
    src = make_image_folder(tmp_path / "one", n_ids=1, per_id=3, size=(8, 8))
    res = runner.invoke(app, ["data", "pairs", str(src), str(tmp_path / "v.bin")])
    assert res.exit_code == 2 and "at least 2 identities" in res.output


def test_inspect_fails_on_image_key_missing_from_index(tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "imgs", n_ids=2, per_id=2, size=(20, 20))
    prefix = tmp_path / "ds"
    assert runner.invoke(app, ["data", "pack", str(src), str(prefix), "--no-progress"]).exit_code == 0
    assert runner.invoke(app, ["data", "inspect", str(prefix)]).exit_code == 0
    idx = Path(f"{prefix}.idx")
    idx.write_text("".join(ln for ln in idx.read_text().splitlines(keepends=True) if not ln.startswith("3\t")))
    res = runner.invoke(app, ["data", "inspect", str(prefix)])
    assert res.exit_code == 1, res.output
    assert "1 of the image keys [1, 5)" in res.output and "the first is key 3" in res.output
    assert "status      FAILED" in res.output


def test_pairs_skips_and_names_an_unreadable_image(tmp_path: Path) -> None:
    from data_pipeline.verification import check_decodable

    src = make_image_folder(tmp_path / "imgs", n_ids=5, per_id=3, size=(12, 12))
    bad = src / "person_000" / "zz_bad.jpg"
    bad.write_bytes(b"junk\n")
    res = runner.invoke(app, ["data", "pairs", str(src), str(tmp_path / "v.bin"), "--pairs", "30",
                              "--json", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    images, _ = load_bin(tmp_path / "v.bin")
    check_decodable(tmp_path / "v.bin", images)
    assert "wrote 30 pairs" in res.output and "15 distinct images" in res.output
    assert "skipped 1 unreadable files" in res.output
    assert f"{bad}: payload of " in res.output and "(UnidentifiedImageError: not an image format" in res.output
    assert json.loads((tmp_path / "p.json").read_text())["skipped"][0]["path"] == str(bad)


def test_inspect_takes_the_forms_data_takes_and_a_missing_dataset_is_one_line(tmp_path: Path) -> None:
    """A PREFIX, its .rec or .idx, or a folder holding train.rec; nothing there: one line, exit 2 (it printed a
    FAILED report of 0 records, exit 1, as if a dataset had been checked)."""
    src = make_image_folder(tmp_path / "imgs", n_ids=3, per_id=2, size=(16, 16))
    prefix = tmp_path / "ds" / "train"
    assert runner.invoke(app, ["data", "pack", str(src), str(prefix), "--no-progress"]).exit_code == 0
    for given in (prefix, f"{prefix}.rec", f"{prefix}.idx", prefix.parent):
        res = runner.invoke(app, ["data", "inspect", str(given)])
        assert res.exit_code == 0 and "status      OK" in res.output, (given, res.output)
    res = runner.invoke(app, ["data", "inspect", str(tmp_path / "nowhere" / "train")])
    assert res.exit_code == 2, res.output
    assert f"pfc data inspect: {tmp_path / 'nowhere' / 'train'}.rec: no such record file" in " ".join(
        res.output.split())


def test_pack_image_size_writes_that_size_and_a_recipe_of_that_size_trains_on_it(tmp_path: Path) -> None:
    """README: `pfc data pack faces/ data/train` shares one pack between runs; the demo recipe trains at
    32 px, so the pack must be able to hold 32x32 images (it always wrote 112x112)."""
    import io
    import os
    import subprocess
    import sys

    from PIL import Image

    src = make_image_folder(tmp_path / "faces", n_ids=4, per_id=4, size=(40, 30))
    prefix = tmp_path / "data" / "train"
    res = runner.invoke(app, ["data", "pack", str(src), str(prefix), "--image-size", "32", "--no-progress",
                              "--json", str(tmp_path / "pack.json")])
    assert res.exit_code == 0, res.output
    assert "resized to 32x32" in res.output and "(4,32,32)" in res.output
    assert (tmp_path / "data" / "property").read_text() == "4,32,32\n"
    assert json.loads((tmp_path / "pack.json").read_text())["image_size"] == [32, 32]
    reader = InsightFaceReader(prefix)
    assert all(Image.open(io.BytesIO(reader.read_image(k)[1])).size == (32, 32) for k in reader.image_keys)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    r = subprocess.run([sys.executable, "-m", "launcher.cli", "train", "demo_cpu", "--data", str(prefix),
                        "--output", str(tmp_path / "run"), "--set", "train.steps=1", "--set", "optim.warmup_steps=0",
                        "--set", "train.batch_size=8", "--set", "data.workers=0"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


def test_pack_image_size_cannot_go_with_no_resize(tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "faces", n_ids=2, per_id=2, size=(20, 20))
    res = runner.invoke(app, ["data", "pack", str(src), str(tmp_path / "o"), "--image-size", "32", "--no-resize",
                              "--no-progress"])
    assert res.exit_code == 2
    assert "pfc data pack: --image-size 32 resizes every image; it cannot go with --no-resize" in res.output
    assert not (tmp_path / "o.rec").exists()
