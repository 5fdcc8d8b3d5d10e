"""The insightface (MS1M) dataset layout on top of MXNet RecordIO.

``PREFIX.rec`` / ``PREFIX.idx`` hold, by key:

* key 0: a header record, ``flag = 2``, label ``[id_start, id_end]``, empty payload;
* keys ``1 .. id_start - 1``: image records, scalar float32 label = class id, payload = JPEG bytes;
* keys ``id_start .. id_end - 1``: one identity record per class ``c = key - id_start``, label
  ``[first_image_key, end_image_key)``, empty payload.

plus a ``property`` file ``num_classes,height,width``. A file without the header record (im2rec
style) is read too: then every record is an image. Labels are float32 on disk, so class ids (and,
in identity records, image keys) are exact only below 2**24; both directions check that.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import numpy as np

from data_pipeline.atomic import atomic_write
from data_pipeline.recordio import IRHeader, RecordIOError, RecordReader, RecordWriter, pack, unpack

__all__ = ["FLOAT32_EXACT_LIMIT", "InsightFaceReader", "InsightFaceWriter", "property_path", "read_property"]

# float32 represents every integer below 2**24 exactly, and not all integers above it.
FLOAT32_EXACT_LIMIT = 1 << 24


def _with_suffix(prefix: str | os.PathLike[str], suffix: str) -> Path:
    # not Path.with_suffix: a prefix such as "faces_v1.2/train" must keep its dots
    return Path(f"{os.fspath(prefix)}{suffix}")


def property_path(prefix: str | os.PathLike[str]) -> Path:
    """Where the property file of ``prefix`` is: ``PREFIX.property`` if it exists, else ``<dir>/property``."""
    own = _with_suffix(prefix, ".property")
    return own if own.is_file() else Path(prefix).parent / "property"


def read_property(prefix: str | os.PathLike[str]) -> tuple[int, int, int]:
    """``(num_classes, height, width)`` from the dataset's property file.

    Raises :class:`RecordIOError` naming the file(s) when it is missing or is not three positive
    integers separated by commas.
    """
    own = _with_suffix(prefix, ".property")
    path = property_path(prefix)
    if not path.is_file():
        raise RecordIOError(f"property file missing: looked for {own} and {path}; it holds "
                            "'num_classes,height,width' (e.g. '85742,112,112')", path=path)
    text = path.read_text(errors="replace").strip()
    fields = [f.strip() for f in text.split(",")]
    try:
        if len(fields) != 3:
            raise ValueError
        num_classes, h, w = (int(f) for f in fields)
        if min(num_classes, h, w) <= 0:
            raise ValueError
    except ValueError:
        raise RecordIOError(f"malformed property {text[:80]!r}: expected 'num_classes,height,width', three "
                            "positive integers", path=path) from None
    if num_classes > FLOAT32_EXACT_LIMIT:
        raise RecordIOError(f"num_classes {num_classes} exceeds 2**24: class ids are stored as float32 "
                            "labels and would lose precision", path=path)
    return num_classes, h, w


def _class_id(label: float, *, num_classes: int, path: Path, key: int, offset: int) -> int:
    """Validate a float32 label as a class id in [0, num_classes)."""
    value = float(label)
    if not np.isfinite(value) or value != int(value):
        raise RecordIOError(f"label {value!r} is not an integer class id", path=path, key=key, offset=offset)
    cid = int(value)
    if cid >= FLOAT32_EXACT_LIMIT:
        raise RecordIOError(f"label {cid} is at or above 2**24: float32 labels cannot hold such class ids "
                            "exactly", path=path, key=key, offset=offset)
    if not 0 <= cid < num_classes:
        raise RecordIOError(f"label {cid} is not in [0, num_classes={num_classes}) from the property file",
                            path=path, key=key, offset=offset)
    return cid


class InsightFaceReader:
    """Read an insightface-layout dataset: image keys, int64 labels, encoded images.

    Cheap to pickle (the file descriptor is reopened lazily in each process), so the same object
    can be given to every DataLoader worker.
    """

    def __init__(self, prefix: str | os.PathLike[str]):
        self.prefix = Path(prefix)
        self.rec_path = _with_suffix(prefix, ".rec")
        self.idx_path = _with_suffix(prefix, ".idx")
        self.num_classes, h, w = read_property(prefix)
        self.image_size: tuple[int, int] = (h, w)
        self._label_limit = min(self.num_classes, FLOAT32_EXACT_LIMIT)
        self._reader = RecordReader(self.rec_path, self.idx_path if self.idx_path.is_file() else None)
        keys = self._reader.key_array
        self.header: tuple[int, int] | None = None
        if 0 in self._reader:
            head = self._reader.read_header(0)
            if head.flag > 0:
                label = np.asarray(head.label)
                if label.size < 2:
                    raise RecordIOError(f"header record has flag {head.flag} but needs the label "
                                        "[id_start, id_end]", path=self.rec_path, key=0,
                                        offset=self._reader.offset(0))
                start, end = float(label[0]), float(label[1])
                if not (np.isfinite(start) and np.isfinite(end) and start == int(start) and end == int(end)
                        and 1 <= start < end):
                    raise RecordIOError(f"header record label [{label[0]!r}, {label[1]!r}] is not [id_start, "
                                        "id_end]: the keys of the first identity record and one past the last, "
                                        "integers with 1 <= id_start < id_end", path=self.rec_path, key=0,
                                        offset=self._reader.offset(0))
                self.header = (int(start), int(end))
        if self.header is not None:
            id_start = self.header[0]
            mask = (keys >= 1) & (keys < id_start)
        else:
            mask = np.ones(len(keys), dtype=bool)
        self._image_keys = keys[mask]
        self.image_keys: list[int] = self._image_keys.tolist()
        self._labels: np.ndarray | None = None

    # -- labels -----------------------------------------------------------------------------------
    @property
    def labels(self) -> np.ndarray:
        """int64 class id of each image, aligned with ``image_keys`` (computed on first use).

        From the identity records when they cover the image keys exactly (one read per class),
        otherwise from every image record's header.
        """
        if self._labels is None:
            labels = self._labels_from_identities()
            if labels is None:
                labels = self._labels_from_headers()
            self._labels = labels
        return self._labels

    def _labels_from_identities(self) -> np.ndarray | None:
        if self.header is None:
            return None
        id_start, id_end = self.header
        n_ids = id_end - id_start
        if n_ids <= 0 or n_ids > self.num_classes:
            return None
        id_keys = np.arange(id_start, id_end, dtype=np.int64)
        try:
            ranges = self._reader.leading_labels(id_keys, count=2)
        except (KeyError, RecordIOError):
            return None  # no usable identity records: fall back to the image headers
        if not np.all(np.isfinite(ranges)):
            return None
        starts, ends = ranges[:, 0].astype(np.int64), ranges[:, 1].astype(np.int64)
        order = np.argsort(starts, kind="stable")
        s, e = starts[order], ends[order]
        if np.any(e < s) or np.any(s[1:] < e[:-1]):
            return None  # overlapping ranges: not trustworthy, use the headers
        pos = np.searchsorted(s, self._image_keys, side="right") - 1
        if np.any(pos < 0):
            return None
        inside = self._image_keys < e[pos]
        if not np.all(inside):
            return None
        return order[pos].astype(np.int64)

    def _labels_from_headers(self) -> np.ndarray:
        values = self._reader.leading_labels(self._image_keys, count=1)[:, 0]
        with np.errstate(invalid="ignore"):
            ok = (np.isfinite(values) & (values == np.floor(values)) & (values >= 0)
                  & (values < min(self.num_classes, FLOAT32_EXACT_LIMIT)))
        if not np.all(ok):
            i = int(np.argmin(ok))
            key = int(self._image_keys[i])
            _class_id(values[i], num_classes=self.num_classes, path=self.rec_path, key=key,
                      offset=self._reader.offset(key))  # raises with the precise reason
        return values.astype(np.int64)

    @staticmethod
    def _scalar_label(head: IRHeader) -> float:
        # insightface's convention: a multi-label image record carries its class id first
        if isinstance(head.label, numbers.Number):
            return float(head.label)  # type: ignore[arg-type]
        lab = np.asarray(head.label).ravel()
        return float(lab[0]) if lab.size else float("nan")

    # -- records ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.image_keys)

    @property
    def reader(self) -> RecordReader:
        """The underlying :class:`RecordReader` (all records, not only images)."""
        return self._reader

    def offset(self, key: int) -> int:
        """Byte offset of record ``key`` in the ``.rec`` (for error messages)."""
        return self._reader.offset(key)

    def read_image(self, key: int) -> tuple[int, bytes]:
        """``(class id, encoded image bytes)`` of image record ``key``.

        The class id comes from the record's own header and is checked against ``num_classes`` and
        2**24; errors are :class:`RecordIOError` naming file, key and byte offset.
        """
        record = self._reader.read(key)
        try:
            head, payload = unpack(record)
        except RecordIOError as exc:
            raise exc.with_context(path=self.rec_path, key=int(key),
                                   offset=self._reader.offset(key)) from None
        value = self._scalar_label(head)
        if not (math.isfinite(value) and value.is_integer() and 0 <= value < self._label_limit):
            _class_id(value, num_classes=self.num_classes, path=self.rec_path, key=int(key),
                      offset=self._reader.offset(key))  # raises with the precise reason
        return int(value), payload

    def write_image_idx(self, path: str | os.PathLike[str], order: Sequence[int] | None = None) -> Path:
        """Write an ``.idx`` listing image records only (for DALI's ``fn.readers.mxnet``).

        ``order``: image keys in the order to list them; default the ``.idx`` order. Returns the path
        written. Note: DALI 2.4's reader sorts index entries by offset, so a permuted ``.idx`` does *not*
        shuffle its reads; ``data_pipeline.dali_pipeline`` gets a global shuffle another way.
        """
        path = Path(path)
        if order is None:
            keys = self._image_keys
        else:
            keys = np.asarray(list(order), dtype=np.int64)
            known = np.isin(keys, self._image_keys)
            if not np.all(known):
                bad = int(keys[np.argmin(known)])
                raise KeyError(f"key {bad} in `order` is not an image record of {self.rec_path}")
            uniq, counts = np.unique(keys, return_counts=True)
            if len(uniq) != len(keys):
                raise ValueError(f"key {int(uniq[np.argmax(counts > 1)])} appears more than once in `order`; "
                                 "an .idx lists each record once")
        offsets = self._reader.offset_array[self._reader.positions(keys)]
        lines = [f"{k}\t{o}\n" for k, o in zip(keys.tolist(), offsets.tolist(), strict=True)]
        atomic_write(path, "".join(lines))
        return path

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> InsightFaceReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class InsightFaceWriter:
    """Write an insightface-layout dataset, one identity at a time.

    ``add_identity(jpegs)`` appends the images of one class and returns its class id (0, 1, ...).
    ``close()`` fills in the header record 0, appends the identity records, and writes the property
    file: ``<dir>/property`` when the prefix's name is ``train`` (MS1M convention), else
    ``PREFIX.property``. Byte-identical to the same records written by MXNet.
    """

    def __init__(self, prefix: str | os.PathLike[str], image_size: tuple[int, int] = (112, 112)):
        self.prefix = Path(prefix)
        self.rec_path = _with_suffix(prefix, ".rec")
        self.idx_path = _with_suffix(prefix, ".idx")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.property_path = (self.prefix.parent / "property" if self.prefix.name == "train"
                              else _with_suffix(prefix, ".property"))
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._writer = RecordWriter(self.rec_path, self.idx_path)
        # header placeholder: same encoded size as the final one, patched in close()
        self._header_offset = self._writer.write(0, pack(IRHeader(0, [0.0, 0.0], 0, 0), b""))
        self._next_key = 1
        self._ranges: list[tuple[int, int]] = []
        self._closed = False

    @property
    def num_classes(self) -> int:
        return len(self._ranges)

    @property
    def num_images(self) -> int:
        return self._next_key - 1

    def add_identity(self, images: Sequence[bytes]) -> int:
        """Append the encoded images of one identity; returns its class id."""
        if self._closed:
            raise ValueError(f"{self.rec_path}: writer is closed")
        if len(images) == 0:
            raise ValueError(f"{self.rec_path}: identity {len(self._ranges)} has no images")
        cid = len(self._ranges)
        if cid + 1 >= FLOAT32_EXACT_LIMIT:
            raise ValueError(f"{self.rec_path}: class id {cid} reaches 2**24; float32 labels cannot hold it")
        first = self._next_key
        # identity records store image keys as float32 too, so they must stay below 2**24
        if first + len(images) + cid + 2 >= FLOAT32_EXACT_LIMIT:
            raise ValueError(f"{self.rec_path}: more than 2**24 records; the insightface layout stores keys "
                             "as float32 labels, exact only below 2**24")
        for img in images:
            self._writer.write(self._next_key, pack(IRHeader(0, float(cid), self._next_key, 0), img))
            self._next_key += 1
        self._ranges.append((first, self._next_key))
        return cid

    def close(self) -> None:
        """Write identity records, the real header record and the property file."""
        if self._closed:
            return
        self._closed = True
        try:
            id_start = self._next_key
            for c, (a, b) in enumerate(self._ranges):
                key = id_start + c
                self._writer.write(key, pack(IRHeader(0, [float(a), float(b)], key, 0), b""))
            id_end = id_start + len(self._ranges)
            self._writer.patch(self._header_offset,
                               pack(IRHeader(0, [float(id_start), float(id_end)], 0, 0), b""))
        finally:
            self._writer.close()
        h, w = self.image_size
        atomic_write(self.property_path, f"{len(self._ranges)},{h},{w}\n")

    def abort(self) -> None:
        """Stop without finishing: nothing appears under the dataset's names (the ``.rec`` and ``.idx``
        were being written under temporary names, which are removed) and no property file is written, so
        the incomplete dataset cannot be mistaken for a complete one."""
        if not self._closed:
            self._closed = True
            self._writer.abort()

    def __enter__(self) -> InsightFaceWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
