"""Face-verification sets in insightface's ``.bin`` format, read without trusting the pickle.

A ``.bin`` (lfw.bin, cfp_fp.bin, agedb_30.bin, ...) is a pickle of ``(images, issame)``: a list of
``2 * P`` encoded images (pair ``i`` is ``images[2i]``, ``images[2i + 1]``) and a list of ``P``
booleans. Files from the Python 2 era hold the images as ``str``, which Python 3 reads back as
``bytes`` with ``encoding="bytes"``.

``load_bin`` uses an unpickler that admits only the types such a file needs: containers and bytes
are built by opcodes without any import, and the few imports allowed (numpy bool scalars, a 1-D numpy
bool array for ``issame`` as ``pickle.dump((bins, np.array(issame)))`` writes it at any protocol, the
``_codecs.encode`` that Python 3 uses for bytes at protocol 2) are wrapped so that they refuse
anything but those uses. Every other import, e.g. ``os.system`` in a ``__reduce__``, raises
:class:`UnsafePickleError` before anything runs.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.atomic import atomic_write

__all__ = ["BinFormatError", "UnsafePickleError", "check_bin", "check_decodable", "decode_check", "load_bin",
           "make_pairs", "save_bin"]


class BinFormatError(ValueError):
    """A file given as a verification ``.bin`` is not one (not a pickle, or not ``(images, issame)`` pairs);
    the message names the file. A user error: the file is wrong, not the program."""


class UnsafePickleError(BinFormatError):
    """A ``.bin`` pickle asked for something outside the verification-set types."""


def _numpy_bool_scalar(dtype: Any, data: bytes | None = None) -> np.bool_:
    # numpy pickles a scalar as scalar(dtype, raw bytes); only a 1-byte bool is admitted
    if not isinstance(dtype, np.dtype) or dtype != np.dtype(np.bool_):
        raise UnsafePickleError(f"numpy scalar of dtype {dtype!r} is not allowed in a verification .bin "
                                "(only numpy bool)")
    if not isinstance(data, (bytes, bytearray)) or len(data) != 1:
        raise UnsafePickleError("malformed numpy bool scalar in a verification .bin")
    return np.bool_(data[0] != 0)


def _numpy_bool_dtype(name: Any, align: Any = False, copy: Any = True) -> np.dtype:
    if name not in ("b1", b"b1", "?", b"?"):
        raise UnsafePickleError(f"numpy dtype {name!r} is not allowed in a verification .bin (only bool)")
    # a fresh instance (as numpy's own unpickling makes): BUILD then sets state on it, not on the
    # process-wide bool dtype
    return np.dtype("b1", align=False, copy=True)


class _NdarrayClass:
    """What the unpickler hands out for ``numpy.ndarray``: only :func:`_numpy_reconstruct` accepts it (it is
    neither callable nor a class, so no opcode can build anything from it, and has no attributes a BUILD
    opcode could set)."""

    __slots__ = ()


_NDARRAY = _NdarrayClass()


def _bool_vector(raw: Any, dtype: Any, shape: Any) -> np.ndarray:
    """A 1-D bool array from its pickled parts, built here from the raw bytes (no numpy code is handed
    anything from the file but bytes)."""
    if not isinstance(dtype, np.dtype) or dtype != np.dtype(np.bool_):
        raise UnsafePickleError(f"numpy array of dtype {dtype!r} is not allowed in a verification .bin "
                                "(only a 1-D bool array for issame)")
    if (not isinstance(shape, tuple) or len(shape) != 1 or type(shape[0]) is not int
            or not isinstance(raw, (bytes, bytearray)) or len(raw) != shape[0]):
        raise UnsafePickleError(f"numpy array of shape {shape!r} is not allowed in a verification .bin "
                                "(only a 1-D bool array for issame)")
    return np.frombuffer(bytes(raw), dtype=np.uint8) != 0


class _BoolArrayState:
    """The empty array ``numpy.core.multiarray._reconstruct`` makes at protocols 0-4; the BUILD opcode
    that follows gives it ``(version, shape, dtype, is_fortran, raw bytes)``."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise UnsafePickleError("malformed numpy array state in a verification .bin")
        _, shape, dtype, _, raw = state
        self.array = _bool_vector(raw, dtype, shape)


def _numpy_reconstruct(cls: Any, shape: Any, typecode: Any) -> _BoolArrayState:
    if cls is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
        raise UnsafePickleError("numpy _reconstruct is allowed in a verification .bin only for a plain ndarray")
    return _BoolArrayState()


def _numpy_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any = "C") -> np.ndarray:
    # protocol 5's form of an array: _frombuffer(raw bytes, dtype, shape, order)
    return _bool_vector(buf, dtype, shape)


def _codecs_encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    # Python 3 pickles bytes at protocol <= 2 as _codecs.encode(latin-1 text, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("only _codecs.encode(str, 'latin1') (bytes at pickle protocol 2) is allowed")
    return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], Callable[..., Any] | _NdarrayClass] = {
    ("numpy.core.multiarray", "scalar"): _numpy_bool_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_bool_scalar,
    ("numpy", "dtype"): _numpy_bool_dtype,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("_codecs", "encode"): _codecs_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        fn = _ALLOWED.get((module, name))
        if fn is None:
            raise UnsafePickleError(f"{self._path}: refusing to load {module}.{name}: a verification .bin "
                                    "may only hold a list of image bytes and a list of bools; this file asks "
                                    "the unpickler to import and call other code (nothing was run)")
        return fn

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._path}: persistent ids are not allowed in a verification .bin")


def decode_check(payload: bytes) -> tuple[int, int]:
    """Fully decode an encoded image with Pillow; returns (h, w). Raises ValueError saying why if it does not
    decode (what `pfc data inspect --deep`, `pfc data pairs` and the .bin checks before training share)."""
    from PIL import Image, UnidentifiedImageError

    from data_pipeline.pack import rgb8

    try:
        with Image.open(io.BytesIO(payload)) as im:
            im.load()  # open() only parses the header; load() runs the whole decoder
            upright = rgb8(im, "payload")  # as the evaluation reads it (a floating-point image is refused)
            return upright.height, upright.width
    except UnidentifiedImageError:
        # its own message names the BytesIO object's address, not the file, which the caller names
        why = "UnidentifiedImageError: not an image format Pillow can read"
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
        why = f"{type(exc).__name__}: {exc}"
    raise ValueError(f"payload of {len(payload)} bytes is not a decodable image ({why})")


def check_decodable(path: str | os.PathLike[str], images: Sequence[bytes]) -> None:
    """:class:`BinFormatError` naming the file and the first of ``images`` that PIL cannot decode (a corrupt or
    truncated JPEG): what an evaluation would otherwise meet in the middle of a run. Each image is decoded
    and dropped (12,000 noisy 112x112 JPEGs: 2.1 s on a 2-core Xeon)."""
    for i, blob in enumerate(images):
        try:
            decode_check(blob)
        except ValueError as exc:
            raise BinFormatError(f"{path}: image {i} of {len(images)} cannot be decoded ({exc})") from None


def check_bin(path: str | os.PathLike[str]) -> None:
    """:class:`BinFormatError` naming ``path`` unless it is a verification ``.bin`` whose every image decodes:
    read through as an evaluation will read it, so that a bad one is refused before the run, not in it."""
    check_decodable(path, load_bin(path)[0])


def load_bin(path: str | os.PathLike[str]) -> tuple[list[bytes], np.ndarray]:
    """``(images, issame)``: ``2 * P`` encoded images and a bool array of ``P`` pair labels.

    Raises :class:`UnsafePickleError` for a pickle that imports anything else, and
    :class:`BinFormatError` naming the file for anything else that is not a verification set (not a
    pickle, a truncated one, a pickle of the wrong shape, no pairs).
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            obj = _RestrictedUnpickler(f, path).load()  # type: ignore[arg-type]
        except UnsafePickleError as exc:
            if str(path) in str(exc):
                raise
            raise UnsafePickleError(f"{path}: {exc}") from None  # the helpers above do not know the file
        except Exception as exc:
            raise BinFormatError(f"{path}: not a readable verification .bin pickle: "
                                 f"{type(exc).__name__}: {exc}") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise BinFormatError(f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    images, issame = obj
    if isinstance(issame, _BoolArrayState):
        issame = issame.array
        if issame is None:
            raise BinFormatError(f"{path}: the second element is a numpy array without its data")
    if isinstance(issame, np.ndarray):  # only a 1-D bool one gets here (see _bool_vector)
        issame = [bool(b) for b in issame]
    if not isinstance(images, (list, tuple)) or not all(isinstance(b, (bytes, bytearray)) for b in images):
        raise BinFormatError(f"{path}: the first element must be a list of encoded images (bytes)")
    if not isinstance(issame, (list, tuple)) or not all(isinstance(b, (bool, np.bool_)) for b in issame):
        # some .bin files store issame as 0/1 integers
        if isinstance(issame, (list, tuple)) and all(type(b) is int and b in (0, 1) for b in issame):
            pass
        else:
            raise BinFormatError(f"{path}: the second element must be a list of bools (issame)")
    if len(images) != 2 * len(issame):
        raise BinFormatError(f"{path}: {len(images)} images for {len(issame)} pairs; expected exactly two "
                             "per pair")
    if not issame:
        raise BinFormatError(f"{path}: holds no pairs (a verification .bin needs at least one)")
    return [bytes(b) for b in images], np.array([bool(b) for b in issame], dtype=bool)


def save_bin(path: str | os.PathLike[str], images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write ``(images, issame)`` as insightface does (a pickle of two lists), atomically."""
    images = [bytes(b) for b in images]
    flags = [bool(b) for b in issame]
    if len(images) != 2 * len(flags):
        raise ValueError(f"{len(images)} images for {len(flags)} pairs; expected exactly two per pair")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, pickle.dumps((images, flags), protocol=4))


def _payload(reader: Any, key: int) -> bytes:
    return bytes(reader.read_image(key)[1])


def _identities_from(src: Path) -> list[list[functools.partial[bytes]]]:
    """Per identity, loaders of its encoded images (from an image folder or a dataset prefix)."""
    if src.is_dir():
        from data_pipeline.pack import list_folder

        return [[functools.partial(Path.read_bytes, p) for p in files] for _, files in list_folder(src)]
    from data_pipeline.insightface import InsightFaceReader

    reader = InsightFaceReader(src)
    groups: dict[int, list[functools.partial[bytes]]] = {}
    for key, cid in zip(reader.image_keys, reader.labels.tolist(), strict=True):
        groups.setdefault(int(cid), []).append(functools.partial(_payload, reader, key))
    return [groups[c] for c in sorted(groups)]


def _source_name(load: functools.partial[bytes]) -> str:
    """The file or record a loader of :func:`_identities_from` reads, for messages (made only when needed:
    a name per image would cost gigabytes on a 42M-image prefix)."""
    if load.func is _payload:
        reader, key = load.args
        return f"{reader.rec_path} record key {key}"
    return str(load.args[0])


def _decode_error(blob: bytes) -> str | None:
    """Why Pillow cannot decode ``blob`` (None if it can): :func:`decode_check`, as :func:`check_decodable`
    runs it on the .bin before `pfc train --val-bin` and `pfc eval`."""
    try:
        decode_check(blob)
    except ValueError as exc:
        return str(exc)
    return None


Pair = tuple[int, int, int, int]  # (identity, image, identity, image)


def _choose_pairs(sizes: list[int], pairs: int, seed: int, src: str | os.PathLike[str]
                  ) -> list[tuple[Pair, bool]]:
    """The labelled pairs of :func:`make_pairs`, in their final order, over identities of ``sizes`` images."""
    n_genuine, n_impostor = pairs // 2, pairs - pairs // 2
    multi = [i for i, n in enumerate(sizes) if n >= 2]
    if len(sizes) < 2:
        raise ValueError(f"{src}: impostor pairs need at least 2 identities, found {len(sizes)}")
    max_genuine = sum(sizes[i] * (sizes[i] - 1) // 2 for i in multi)
    if n_genuine > max_genuine:
        raise ValueError(f"{src}: {n_genuine} genuine pairs requested but only {max_genuine} distinct ones "
                         "exist (identities need at least two images)")
    rng = np.random.default_rng(seed)
    chosen: set[Pair] = set()
    genuine: list[Pair] = []
    # weight identities by their number of possible pairs, so that small ones are not exhausted first
    weights = np.array([sizes[i] * (sizes[i] - 1) / 2 for i in multi], dtype=np.float64)
    weights /= weights.sum() if len(weights) else 1.0
    while len(genuine) < n_genuine:
        i = multi[int(rng.choice(len(multi), p=weights))]
        a, b = sorted(rng.choice(sizes[i], size=2, replace=False).tolist())
        if (i, a, i, b) not in chosen:
            chosen.add((i, a, i, b))
            genuine.append((i, a, i, b))
    total_images = sum(sizes)
    max_impostor = (total_images * total_images - sum(n ** 2 for n in sizes)) // 2
    if n_impostor > max_impostor:
        raise ValueError(f"{src}: {n_impostor} impostor pairs requested but only {max_impostor} exist")
    impostor: list[Pair] = []
    while len(impostor) < n_impostor:
        i, j = sorted(rng.choice(len(sizes), size=2, replace=False).tolist())
        a, b = int(rng.integers(sizes[i])), int(rng.integers(sizes[j]))
        if (i, a, j, b) not in chosen:
            chosen.add((i, a, j, b))
            impostor.append((i, a, j, b))
    labelled = [(p, True) for p in genuine] + [(p, False) for p in impostor]
    order = rng.permutation(len(labelled))
    return [labelled[n] for n in order.tolist()]


def make_pairs(src: str | os.PathLike[str], out: str | os.PathLike[str], *, pairs: int = 600,
               seed: int = 0) -> dict[str, Any]:
    """Build a balanced verification ``.bin`` from images: ``pairs // 2`` genuine pairs (two different
    images of one identity) and ``pairs - pairs // 2`` impostor pairs (images of two identities),
    without repeated pairs, shuffled; all reproducible from ``seed``.

    ``src`` is an image folder (one subfolder per identity) or a dataset prefix (``PREFIX.rec``).
    Images are stored as they are encoded in the source, and each one written is decoded first: one that
    does not decode is skipped, as ``pfc data pack`` skips it, and listed in the summary's ``skipped``
    (``{"path", "error"}``); the pairs are then exactly those of the source without it. Returns a summary
    dict.
    """
    if pairs < 2:
        raise ValueError(f"need at least 2 pairs (one genuine, one impostor), got {pairs}")
    found = _identities_from(Path(src))
    good: dict[functools.partial[bytes], bytes] = {}  # loaders are hashed by identity: one per image
    bad: dict[functools.partial[bytes], str] = {}
    # Only the images the pairs use are read (a dataset prefix may hold 42M), so an unreadable one is found
    # only once chosen. It is then dropped and the pairs are chosen again from the same seed: the result is
    # what the source without it gives, and each round drops at least one image, so this ends.
    while True:
        # an identity left with no readable image is dropped, as pack drops it
        ids = found if not bad else [kept for imgs in found if (kept := [im for im in imgs if im not in bad])]
        try:
            labelled = _choose_pairs([len(imgs) for imgs in ids], pairs, seed, src)
        except ValueError as exc:
            if not bad:
                raise
            first, why = next(iter(bad.items()))
            raise ValueError(f"{exc} (after skipping {len(bad)} unreadable images, the first "
                             f"{_source_name(first)}: {why})") from None
        used = dict.fromkeys(ia for (i, a, j, b), _ in labelled for ia in ((i, a), (j, b)))
        for i, a in used:
            load = ids[i][a]
            if load not in good and load not in bad:
                blob = load()
                err = _decode_error(blob)
                if err is None:
                    good[load] = blob
                else:
                    bad[load] = err
        if all(ids[i][a] in good for i, a in used):
            break
    images: list[bytes] = []
    issame: list[bool] = []
    for (i, a, j, b), same in labelled:
        images += [good[ids[i][a]], good[ids[j][b]]]
        issame.append(same)
    save_bin(out, images, issame)
    n_genuine = sum(issame)
    return {"source": str(src), "out": str(out), "pairs": len(issame), "genuine": n_genuine,
            "impostor": len(issame) - n_genuine, "identities": len(ids), "identities_used":
            len({p[0] for p, _ in labelled} | {p[2] for p, _ in labelled}), "distinct_images": len(used),
            "seed": seed, "skipped": [{"path": _source_name(load), "error": err} for load, err in bad.items()]}
