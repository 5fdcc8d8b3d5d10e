"""Verification .bin files: restricted unpickling, Python 2 era pickles, pair building."""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.insightface import InsightFaceWriter
from data_pipeline.verification import UnsafePickleError, load_bin, make_pairs, save_bin
from tests.data_pipeline.helpers import jpeg_bytes, make_image_folder


def test_save_load_roundtrip(tmp_path: Path) -> None:
    images = [jpeg_bytes(i) for i in range(6)]
    save_bin(tmp_path / "v.bin", images, [True, False, True])
    got_images, issame = load_bin(tmp_path / "v.bin")
    assert got_images == images
    assert issame.dtype == bool and issame.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="two per pair"):
        save_bin(tmp_path / "w.bin", images[:5], [True, False, True])


def _py2_protocol2(images: list[bytes], flags: list[bool]) -> bytes:
    """What Python 2's cPickle.dump((list_of_str, list_of_bool), f, protocol=2) produces (no memo)."""
    out = [b"\x80\x02", b"(", b"]", b"("]
    for img in images:
        if len(img) < 256:
            out.append(b"U" + bytes([len(img)]) + img)  # SHORT_BINSTRING
        else:
            out.append(b"T" + struct.pack("<I", len(img)) + img)  # BINSTRING
    out += [b"e", b"]", b"("]
    out += [b"\x88" if f else b"\x89" for f in flags]
    out += [b"e", b"t", b"."]
    return b"".join(out)


def _py2_protocol0(images: list[bytes], flags: list[bool]) -> bytes:
    """Python 2's text protocol: S'...' strings with escapes, I01/I00 booleans."""
    out = [b"((lp0\n"]
    for img in images:
        escaped = "".join(f"\\x{c:02x}" for c in img).encode()
        out.append(b"S'" + escaped + b"'\na")
    out.append(b"(lp1\n")
    for f in flags:
        out.append(b"I01\na" if f else b"I00\na")
    out.append(b"tp2\n.")
    return b"".join(out)


@pytest.mark.parametrize("writer", [_py2_protocol2, _py2_protocol0])
def test_python2_era_bin(tmp_path: Path, writer) -> None:  # type: ignore[no-untyped-def]
    images = [jpeg_bytes(i) for i in range(4)] + [b"\xff\xd8'\\\n\x00"]  # quotes, backslash, NUL
    images.append(b"x" * 300)  # long string opcode
    flags = [True, False, True]
    path = tmp_path / "py2.bin"
    path.write_bytes(writer(images, flags))
    got, issame = load_bin(path)
    assert got == images and issame.tolist() == flags


def test_numpy_bools_and_protocol2_bytes_are_accepted(tmp_path: Path) -> None:
    images = [b"a", b"b", b"c", b"d"]
    for proto in (2, 4):  # Python 3 at protocol 2 stores bytes through _codecs.encode
        path = tmp_path / f"np{proto}.bin"
        path.write_bytes(pickle.dumps((images, [np.bool_(True), np.bool_(False)]), protocol=proto))
        got, issame = load_bin(path)
        assert got == images and issame.tolist() == [True, False]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (eval, ("__import__('os').getpid()",))


def test_malicious_bin_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(([b"a", b"b"], [_Evil(marker)]), protocol=2)
    # the payload is live: the ordinary unpickler would run it
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(control)))
    assert control.exists()
    path = tmp_path / "evil.bin"
    path.write_bytes(payload)
    with pytest.raises(UnsafePickleError, match=r"refusing to load (posix|os)\.system") as err:
        load_bin(path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    path.write_bytes(pickle.dumps(_EvalEvil()))
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        load_bin(path)


def test_numpy_non_bool_scalars_refused(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b"], [np.float64(1.0)])))
    with pytest.raises(UnsafePickleError, match=r"dtype .* is not allowed in a verification \.bin"):
        load_bin(path)
    path.write_bytes(pickle.dumps(([b"a", b"b"], [np.array([True])])))  # a list of arrays is no issame
    with pytest.raises(ValueError, match="must be a list of bools"):
        load_bin(path)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_issame_as_a_numpy_bool_array_is_accepted(tmp_path: Path, protocol: int) -> None:
    """``pickle.dump((bins, np.array(issame)))``, as some converters write a .bin: numpy's _reconstruct at
    protocols 0-4, its _frombuffer at 5. Refused as unsafe before; read as the list of bools it holds."""
    images = [jpeg_bytes(i) for i in range(8)]
    flags = np.array([True, False, False, True])
    path = tmp_path / "a.bin"
    path.write_bytes(pickle.dumps((images, flags), protocol=protocol))
    got, issame = load_bin(path)
    assert got == images and issame.dtype == bool and issame.tolist() == flags.tolist()


@pytest.mark.parametrize("array", [np.array([1.0, 0.0]), np.array([1, 0]), np.array([True, False], dtype=object),
                                   np.array([[True], [False]])])
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_arrays_other_than_1d_bool_are_refused(tmp_path: Path, array: np.ndarray, protocol: int) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b", b"c", b"d"], array), protocol=protocol))
    with pytest.raises(UnsafePickleError, match=r"not allowed in a verification \.bin|refusing to load") as err:
        load_bin(path)
    assert str(err.value).startswith(f"{path}: ")


def test_wrong_structure(tmp_path: Path) -> None:
    path = tmp_path / "s.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True])))
    with pytest.raises(ValueError, match="3 images for 1 pairs"):
        load_bin(path)
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="expected a pickled"):
        load_bin(path)
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="not a readable verification"):
        load_bin(path)


def _owner(folder: Path) -> dict[bytes, str]:
    return {p.read_bytes(): d.name for d in folder.iterdir() for p in d.iterdir()}


def test_make_pairs_from_folder(tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "imgs", n_ids=5, per_id=4, size=(8, 8))
    owner = _owner(src)
    summary = make_pairs(src, tmp_path / "p.bin", pairs=20, seed=3)
    assert (summary["pairs"], summary["genuine"], summary["impostor"]) == (20, 10, 10)
    images, issame = load_bin(tmp_path / "p.bin")
    assert len(images) == 40 and int(issame.sum()) == 10
    seen = set()
    for i, same in enumerate(issame.tolist()):
        a, b = images[2 * i], images[2 * i + 1]
        assert a != b
        assert (owner[a] == owner[b]) == same
        pair = frozenset((a, b))
        assert pair not in seen
        seen.add(pair)
    # seeded: same seed same bytes, another seed another set
    make_pairs(src, tmp_path / "q.bin", pairs=20, seed=3)
    assert (tmp_path / "q.bin").read_bytes() == (tmp_path / "p.bin").read_bytes()
    make_pairs(src, tmp_path / "r.bin", pairs=20, seed=4)
    assert (tmp_path / "r.bin").read_bytes() != (tmp_path / "p.bin").read_bytes()
    with pytest.raises(ValueError, match="genuine pairs requested"):
        make_pairs(src, tmp_path / "x.bin", pairs=100, seed=0)  # only 5 * 6 = 30 genuine pairs exist


def test_make_pairs_from_dataset(tmp_path: Path) -> None:
    groups = [[jpeg_bytes(10 * c + j) for j in range(3)] for c in range(4)]
    with InsightFaceWriter(tmp_path / "ds") as w:
        for g in groups:
            w.add_identity(g)
    owner = {img: c for c, g in enumerate(groups) for img in g}
    make_pairs(tmp_path / "ds", tmp_path / "p.bin", pairs=9, seed=0)
    images, issame = load_bin(tmp_path / "p.bin")
    assert len(issame) == 9 and int(issame.sum()) == 4
    for i, same in enumerate(issame.tolist()):
        assert (owner[images[2 * i]] == owner[images[2 * i + 1]]) == same


def test_make_pairs_skips_an_unreadable_image(tmp_path: Path) -> None:
    """A file that does not decode never reaches the .bin (which `pfc train --val-bin` / `pfc eval` would
    refuse): it is skipped and named, as `pfc data pack` skips it, and the pairs are those of the folder
    without it."""
    from data_pipeline.verification import check_decodable

    clean = make_image_folder(tmp_path / "clean", n_ids=5, per_id=3, size=(8, 8))
    make_pairs(clean, tmp_path / "clean.bin", pairs=30, seed=0)
    src = make_image_folder(tmp_path / "imgs", n_ids=5, per_id=3, size=(8, 8))
    bad = src / "person_000" / "zz_bad.jpg"
    bad.write_bytes(b"junk\n")
    truncated = src / "person_002" / "zz_cut.png"
    truncated.write_bytes((src / "person_002" / "0.png").read_bytes()[:60])
    summary = make_pairs(src, tmp_path / "p.bin", pairs=30, seed=0)
    images, issame = load_bin(tmp_path / "p.bin")
    check_decodable(tmp_path / "p.bin", images)
    assert sorted(s["path"] for s in summary["skipped"]) == [str(bad), str(truncated)]
    assert all(s["error"] for s in summary["skipped"])
    assert b"junk\n" not in images and len(issame) == 30 and summary["distinct_images"] == 15
    assert (tmp_path / "p.bin").read_bytes() == (tmp_path / "clean.bin").read_bytes()
    # from a dataset prefix too: an undecodable record is named by its key
    with InsightFaceWriter(tmp_path / "ds") as w:
        w.add_identity([jpeg_bytes(0), b"\xff\xd8 not a JPEG", jpeg_bytes(1)])
        w.add_identity([jpeg_bytes(2), jpeg_bytes(3)])
    summary = make_pairs(tmp_path / "ds", tmp_path / "d.bin", pairs=4, seed=0)
    assert [s["path"] for s in summary["skipped"]] == [f"{tmp_path / 'ds'}.rec record key 2"]
    check_decodable(tmp_path / "d.bin", load_bin(tmp_path / "d.bin")[0])
    # nothing readable left for the pairs asked: the error says what was skipped
    with pytest.raises(ValueError, match=r"after skipping 1 unreadable images, the first .*record key 2"):
        make_pairs(tmp_path / "ds", tmp_path / "e.bin", pairs=6, seed=0)


def test_a_file_that_is_not_a_verification_bin_is_a_user_error_naming_it(tmp_path: Path) -> None:
    """Garbage, a truncated copy, a pickle of no pairs: :class:`BinFormatError` (a user error of `pfc`: one
    line, exit 2), naming the file; ``check_val_bins`` refuses such a ``data.val_bins`` before training."""
    from data_pipeline.verification import BinFormatError
    from launcher.commands.output import user_error_types
    from launcher.config import load_config
    from launcher.errors import DataError
    from launcher.trainer.batches import check_val_bins

    good = tmp_path / "good.bin"
    images = []
    for shade in (0, 80, 160, 240):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (shade, shade, shade)).save(buf, format="JPEG")
        images.append(buf.getvalue())
    save_bin(good, images, [True, False])
    bad = {"garbage.bin": b"garbage\n", "truncated.bin": good.read_bytes()[:20],
           "empty.bin": pickle.dumps(([], []))}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BinFormatError, match=str(tmp_path / name)) as err:
            load_bin(tmp_path / name)
        assert isinstance(err.value, user_error_types())
        cfg = load_config(None, [f'data.val_bins=["{good}", "{tmp_path / name}"]'])
        with pytest.raises(DataError, match=rf"data.val_bins: {tmp_path / name}: .*verification \.bin"):
            check_val_bins(cfg)
    check_val_bins(load_config(None, [f'data.val_bins=["{good}"]']))
    assert issubclass(UnsafePickleError, BinFormatError)
