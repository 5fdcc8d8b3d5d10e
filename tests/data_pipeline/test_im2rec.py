"""Files written by MXNet's own ``tools/im2rec.py`` (in .venv-mxnet), read as training data.

``im2rec --pack-label`` stores every label column of the ``.lst`` as a float32 array (flag > 0) in front of
the JPEG, keys from the ``.lst``'s index column, so key 0 is an image whose label array starts with its
class id. Taken for insightface's header record (flag > 0 at key 0), its ``[class, x]`` was refused as a
bad ``[id_start, id_end]`` and the whole file with it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.checks import inspect_dataset
from data_pipeline.insightface import InsightFaceReader
from data_pipeline.recordio import RecordReader, unpack
from tests.support.oracle import ORACLE_PYTHON, require_oracle

pytestmark = pytest.mark.oracle


def _im2rec(folder: Path, labels: list[list[float]], *extra: str) -> Path:
    """Images 0..n-1 in ``folder``, a ``.lst`` with the label columns ``labels``, packed by MXNet's im2rec;
    returns the PREFIX (``faces.rec``/``faces.idx``)."""
    require_oracle()
    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, row in enumerate(labels):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
        lines.append("\t".join([str(i), *(f"{v:g}" for v in row), f"{i}.jpg"]))
    (folder / "faces.lst").write_text("\n".join(lines) + "\n")
    tool = next(ORACLE_PYTHON.parents[1].glob("lib/python*/site-packages/mxnet/tools/im2rec.py"))
    done = subprocess.run([str(ORACLE_PYTHON), str(tool), *extra, "--num-thread", "1", "faces.lst", "."],
                          cwd=folder, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    prefix = folder / "faces"
    assert Path(f"{prefix}.rec").stat().st_size > 0 and Path(f"{prefix}.idx").is_file()
    return prefix


def test_im2rec_pack_label_file_reads_with_class_ids_first(tmp_path: Path) -> None:
    rows = [[i % 3, 0.25 * i] for i in range(7)]  # key 0: label [0, 0], what a header [id_start, id_end] is not
    prefix = _im2rec(tmp_path / "im", rows, "--pack-label")
    head, payload = unpack(RecordReader(f"{prefix}.rec", f"{prefix}.idx").read(0))
    assert head.flag == 2 and head.label.tolist() == [0.0, 0.0] and payload[:2] == b"\xff\xd8"  # an image
    Path(f"{prefix}.property").write_text("3,16,16\n")
    reader = InsightFaceReader(prefix)
    assert reader.header is None
    assert reader.image_keys == list(range(7))
    assert reader.labels.tolist() == [i % 3 for i in range(7)]
    assert reader.read_image(0)[0] == 0 and reader.read_image(5)[0] == 2
    report = inspect_dataset(prefix)
    assert report["errors"] == [] and report["corrupt"] == [] and report["images"] == 7, report
    assert report["identities"] == 3


def test_im2rec_scalar_label_file_reads(tmp_path: Path) -> None:
    """The default (one label column, scalar label) still reads: key 0 is an image there too."""
    prefix = _im2rec(tmp_path / "im", [[i % 2] for i in range(4)])
    Path(f"{prefix}.property").write_text("2,16,16\n")
    reader = InsightFaceReader(prefix)
    assert reader.header is None and reader.labels.tolist() == [0, 1, 0, 1]
