"""Dataset integrity check behind ``pfc data inspect``.

By default every record listed by the ``.idx`` (or found by scanning the ``.rec``) is checked from its
*head*: the chunk magic, the cflag, that the record ends inside the file, the IRHeader and its labels, the
insightface header and identity records (exact key ranges, :mod:`data_pipeline.insightface`), that the index
holds every image key ``[1, id_start)`` and every key an identity range covers (binary searches over the
sorted keys), and that every image's label agrees with the identity record covering it. Heads are read
vectorised (:meth:`RecordReader.iter_heads`: one positioned read per 64 MiB run, numpy for the rest), so 42M
records take seconds; split records (rare) are read whole. ``deep`` also decodes every image record;
``sample`` (``--quick``) checks the header, every identity record and a random sample of image records,
and derives the counts from the index and the identity records. Problems with one record are listed by key
and byte offset; problems with the dataset as a whole (a missing property file, an unreadable index, image
keys missing from it) as errors.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from data_pipeline.inspect_report import format_report, leftover_warnings, note_image_sizes
from data_pipeline.key_ranges import (
    FLOAT32_EXACT_LIMIT,
    absent_keys,
    exact_range,
    first_absent_key,
    header_record,
    resolve_header,
    valid_class_ids,
)
from data_pipeline.progress_bar import progress_bar
from data_pipeline.property_file import prefix_path, read_property
from data_pipeline.record_format import LEN_MASK, MAGIC, RecordIOError, unpack
from data_pipeline.recordio import RecordReader
from data_pipeline.verification import decode_check

__all__ = ["decode_check", "format_report", "inspect_dataset"]


def _corrupt(key: int, offset: int | None, error: str) -> dict[str, Any]:
    return {"key": int(key), "offset": None if offset is None else int(offset), "error": error}


def inspect_dataset(prefix: str | os.PathLike[str], deep: bool = False, progress: bool = False,
                    sample: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Check the records of ``PREFIX.rec`` and summarise the dataset (a JSON-ready dict).

    Keys: ``ok`` (no corrupt record and no error), ``records``, ``images``, ``identities``
    (classes with at least one image), ``num_classes`` (from the property file),
    ``images_per_identity`` (min/max/mean/median), ``header`` ([id_start, id_end] or None),
    ``corrupt`` (list of ``{"key", "offset", "error"}``), ``errors`` and ``warnings`` (strings),
    ``decoded`` (images that decoded, with ``deep``), ``image_sizes`` (with ``deep``: {"HxW": n}),
    ``checked`` (image records checked) and ``sampled`` (None, or the sample size of ``--quick``).

    ``sample`` N: check the header and identity records and N image records drawn with ``seed``;
    ``images``/``identities`` then count the image keys of the index and the identity ranges.
    """
    rec_path = prefix_path(prefix, ".rec")
    idx_path = prefix_path(prefix, ".idx")
    report: dict[str, Any] = {
        "prefix": str(prefix), "rec": str(rec_path), "idx": str(idx_path) if idx_path.is_file() else None,
        "deep": deep, "sampled": sample, "records": 0, "images": 0, "identities": 0, "checked": 0,
        "num_classes": None, "image_size": None, "header": None, "images_per_identity": None, "corrupt": [],
        "errors": [], "warnings": [], "decoded": 0, "image_sizes": {},
    }
    corrupt: list[dict[str, Any]] = report["corrupt"]
    errors: list[str] = report["errors"]
    warnings: list[str] = report["warnings"]

    num_classes: int | None = None
    try:
        num_classes, h, w = read_property(prefix)
        report["num_classes"], report["image_size"] = num_classes, [h, w]
    except RecordIOError as exc:
        errors.append(str(exc))
    warnings.extend(leftover_warnings(prefix))
    if not idx_path.is_file():
        warnings.append(f"{idx_path} not found: scanned {rec_path} (keys are record numbers)")
    try:
        reader = RecordReader(rec_path, idx_path if idx_path.is_file() else None)
    except RecordIOError as exc:
        if exc.key is not None:
            corrupt.append(_corrupt(exc.key, exc.offset, str(exc)))
        else:
            errors.append(str(exc))
        report["ok"] = False
        return report

    with reader:
        _Inspection(reader, report, num_classes, deep, sample, seed, progress).run()
    report["corrupt"] = sorted(corrupt, key=lambda c: (c["offset"] is None, c["offset"] or 0, c["key"]))
    report["ok"] = not corrupt and not errors
    return report


class _Inspection:
    """One run of :func:`inspect_dataset` over an open reader (fills ``report``)."""

    def __init__(self, reader: RecordReader, report: dict[str, Any], num_classes: int | None, deep: bool,
                 sample: int | None, seed: int, progress: bool) -> None:
        self.reader = reader
        self.report = report
        self.num_classes = num_classes
        self.deep = deep
        self.sample = sample
        self.seed = seed
        self.progress = progress
        self.rec_path = reader.rec_path
        self.corrupt: list[dict[str, Any]] = report["corrupt"]
        self.bad_keys: set[int] = set()

    def where(self, key: int, offset: int) -> str:
        return f"{self.rec_path}, record key {key}, byte offset {offset}"

    def flag_corrupt(self, key: int, offset: int, error: str) -> None:
        self.bad_keys.add(key)
        self.corrupt.append(_corrupt(key, offset, error))

    def precise_error(self, pos: int) -> RecordIOError | None:
        """Read record ``pos`` whole: the reader's exact error for it, or None if it is sound."""
        key = int(self.reader.key_array[pos])
        try:
            unpack(self.reader.read(key))
        except RecordIOError as exc:
            return exc.with_context(path=self.rec_path, key=key, offset=int(self.reader.offset_array[pos]))
        return None

    def sound(self, pos: np.ndarray, h: np.ndarray) -> np.ndarray:
        """Which heads are structurally sound (magic, cflag, inside the file); the others are read
        whole for their exact error (listed as corrupt) or, when they are split records that read
        fine, kept. Returns a bool mask."""
        offs = np.asarray(self.reader.offset_array[pos], dtype=np.int64)
        cflag, length = h["lrec"] >> 29, (h["lrec"] & LEN_MASK).astype(np.int64)
        ok = (h["magic"] == MAGIC) & (cflag == 0) & (offs + 8 + length <= self.reader.file_size)
        ok &= length >= 24 + 4 * np.minimum(h["flag"], 2).astype(np.int64)
        for i in np.flatnonzero(~ok).tolist():
            err = self.precise_error(int(pos[i]))
            if err is not None:
                self.flag_corrupt(int(self.reader.key_array[pos[i]]), int(offs[i]), str(err))
            else:
                ok[i] = True  # a split record (or a short one) that reads whole: take its head from it
                full, payload = unpack(self.reader.read(int(self.reader.key_array[pos[i]])))
                lab = np.atleast_1d(np.asarray(full.label, dtype=np.float32)).ravel()
                h["flag"][i], h["id"][i], h["id2"][i] = full.flag, full.id, full.id2
                h["label"][i] = lab[0] if full.flag == 0 and lab.size else 0.0
                h["l0"][i] = lab[0] if full.flag > 0 and lab.size else np.nan
                h["l1"][i] = lab[1] if lab.size > 1 else np.nan
                # the identity checks judge "no payload" from the length
                h["lrec"][i] = 24 + 4 * full.flag + len(payload)
        return ok

    def run(self) -> None:
        reader, report = self.reader, self.report
        keys = reader.key_array
        n = len(keys)
        report["records"] = n
        header: tuple[int, int] | None = None
        if 0 in reader:
            try:
                head = header_record(reader)
                if head is not None and np.asarray(head.label).size >= 2:
                    header = resolve_header(reader, head, self.num_classes)
            except RecordIOError as exc:
                self.flag_corrupt(0, reader.offset(0), str(exc.with_context(path=self.rec_path, key=0,
                                                                             offset=reader.offset(0))))
                # without a header no record can be told to be an image or an identity record:
                # checking them as images would bury the one real error under thousands
                report["warnings"].append("the header record is unusable: image and identity records were "
                                          "not checked")
                return
        report["header"] = list(header) if header is not None else None
        if header is not None and self.num_classes is not None and header[1] - header[0] != self.num_classes:
            report["warnings"].append(f"header record lists {header[1] - header[0]} identity records "
                                      f"([{header[0]}, {header[1]})) but the property says {self.num_classes} "
                                      "classes")
        if header is not None:
            self.missing_images(header[0])
        ranges = self.identities(header) if header is not None else None
        counts = self.images(header, ranges)
        present = counts[counts > 0]
        report["identities"] = int(present.size)
        if present.size:
            report["images_per_identity"] = {"min": int(present.min()), "max": int(present.max()),
                                             "mean": float(present.mean()), "median": float(np.median(present))}
        if self.num_classes is not None and present.size < self.num_classes:
            report["warnings"].append(f"{self.num_classes - int(present.size)} of {self.num_classes} classes "
                                      "have no images")

    def missing_images(self, id_start: int) -> None:
        """Every key in ``[1, id_start)`` must be in the index: insightface's own loader (arcface_torch's
        MXFaceDataset) reads each of ``range(1, header.label[0])`` and stops with a KeyError at the first
        gap, however sound the records that are there. Counted with two binary searches (keys are unique)."""
        sk, where = self.reader.sorted_keys, self.report["idx"] or f"{self.rec_path} (scanned)"
        if (absent := int(absent_keys(sk, 1, id_start))) > 0:
            self.report["errors"].append(
                f"{where}: {absent} of the image keys [1, {id_start}) that the header record implies are not in "
                f"the index, the first is key {first_absent_key(sk, 1, id_start)} (insightface's loader reads "
                f"every key below id_start={id_start} and fails on a missing one)")

    def identities(self, header: tuple[int, int]) -> dict[str, np.ndarray]:
        """Check the identity records; their exact ranges (sorted by first key) for the image pass."""
        reader = self.reader
        s, e = header
        keys = np.arange(s, e, dtype=np.int64)
        sk = reader.sorted_keys  # binary search: no sort of all keys (np.isin's peak at 42M: ~1 GB)
        at = np.searchsorted(sk, keys).clip(0, max(len(sk) - 1, 0))
        present = sk[at] == keys if len(sk) else np.zeros(len(keys), dtype=bool)
        for k in keys[~present][:50].tolist():
            self.report["warnings"].append(f"identity record key {k} (header range [{s}, {e})) is not in the index")
        keys = keys[present]
        pos = reader.positions(keys)
        cls_l, a_l, b_l, exact_l = [], [], [], []
        for p, h in reader.iter_heads(pos):
            ok = self.sound(p, h)
            k = reader.key_array[p]
            offs = reader.offset_array[p]
            length = (h["lrec"] & LEN_MASK).astype(np.int64)
            a, b, exact = exact_range(h["l0"], h["l1"], h["id"], h["id2"])
            shape_ok = (h["flag"] >= 2) & (length == 24 + 4 * h["flag"].astype(np.int64))
            finite = np.isfinite(h["l0"]) & np.isfinite(h["l1"])
            for i in np.flatnonzero(ok & ~(shape_ok & finite)).tolist():
                self.flag_corrupt(int(k[i]), int(offs[i]), f"{self.where(int(k[i]), int(offs[i]))}: identity "
                                  f"record must have a 2-float label [first, end) and no payload (flag "
                                  f"{int(h['flag'][i])})")
            ok &= shape_ok & finite
            # a legacy range past 2**24 may be off by float32 rounding: compare within it
            # (some exact range within the rounding fits: 1 <= first <= end <= id_start)
            sa = np.where(exact, 0, np.spacing(a.astype(np.float32)).astype(np.int64))
            sb = np.where(exact, 0, np.spacing(b.astype(np.float32)).astype(np.int64))
            inside = (a + sa >= 1) & (a - sa <= b + sb) & (b - sb <= s)
            for i in np.flatnonzero(ok & ~inside).tolist():
                self.flag_corrupt(int(k[i]), int(offs[i]), f"{self.where(int(k[i]), int(offs[i]))}: identity "
                                  f"record range [{int(a[i])}, {int(b[i])}) is not inside the image keys [1, {s})")
            ok &= inside
            # the keys a range covers must all be in the index, or a reader walking the class's range
            # meets a missing record; for a legacy range (float32-rounded) only the part every exact
            # range it could round from covers is checked
            first = np.maximum(a + sa, 1)
            end = np.maximum(np.minimum(b - sb, s), first)  # that part may be empty (a 1-image class)
            lacking = absent_keys(sk, first, end)
            for i in np.flatnonzero(ok & (lacking > 0)).tolist():
                self.flag_corrupt(int(k[i]), int(offs[i]), f"{self.where(int(k[i]), int(offs[i]))}: identity "
                                  f"record for class {int(k[i]) - s} covers image keys [{int(a[i])}, {int(b[i])}) "
                                  f"but the index lacks {int(lacking[i])} of them, the first is key "
                                  f"{first_absent_key(sk, int(first[i]), int(end[i]))}")
            # the range itself stays in use: the labels of the images that are there are still checked
            # against it, and --quick counts the class's images from it
            cls_l.append(k[ok] - s)
            a_l.append(a[ok])
            b_l.append(b[ok])
            exact_l.append(exact[ok])
        cat = (lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.empty(0, dt))  # noqa: E731
        cls, a, b, exact = cat(cls_l, np.int64), cat(a_l, np.int64), cat(b_l, np.int64), cat(exact_l, bool)
        order = np.argsort(a, kind="stable")
        return {"cls": cls[order], "a": a[order], "b": b[order], "exact": exact[order],
                "ikey": (cls[order] + s)}

    def images(self, header: tuple[int, int] | None, ranges: dict[str, np.ndarray] | None) -> np.ndarray:
        """Check image records (all, or a sample); returns per-class image counts."""
        reader, report = self.reader, self.report
        keys = reader.key_array
        n = len(keys)
        n_cls = self.num_classes if self.num_classes is not None else 0
        counts = np.zeros(max(n_cls, 1), dtype=np.int64)
        if header is not None:
            s, e = header
            if reader.keys_increasing:
                lo, hi = (int(x) for x in np.searchsorted(keys, [1, s]))
                image_pos: np.ndarray | None = None  # a contiguous slice of positions
                n_img = hi - lo
            else:
                image_pos = np.flatnonzero((keys >= 1) & (keys < s))
                lo, hi, n_img = 0, 0, len(image_pos)
            lo_id, hi_id = np.searchsorted(reader.sorted_keys, [s, e])
            stray = n - n_img - 1 - int(hi_id - lo_id)
            if stray > 0:
                report["warnings"].append(f"{stray} records have keys outside the layout's image and identity "
                                          "ranges")
        else:
            image_pos, lo, hi, n_img = None, 0, n, n
        if self.sample is not None:
            return self._sampled(image_pos, lo, n_img, ranges, counts)
        mismatch: dict[int, list[int]] = {}  # identity record key -> [first wrong image key, wrong label, count]
        bar = progress_bar(n_img, self.progress, unit="rec", desc="checking")
        heads = reader.iter_heads(image_pos) if image_pos is not None else reader.iter_heads(start=lo, stop=hi)
        for p, h in heads:
            counts = self._check_images(p, h, ranges, counts, mismatch)
            bar.update(len(p))
        bar.close()
        for ikey, (k, lab, cnt) in sorted(mismatch.items()):
            cid = ikey - header[0] if header is not None else -1
            a, b = self._range_of(ranges, cid)
            off = int(reader.offset(ikey))
            self.flag_corrupt(ikey, off, f"{self.where(ikey, off)}: identity record for class {cid} covers image "
                              f"keys [{a}, {b}) but image key {k} has label {lab} ({cnt} such images)")
        return counts

    @staticmethod
    def _range_of(ranges: dict[str, np.ndarray] | None, cid: int) -> tuple[int, int]:
        assert ranges is not None
        i = int(np.flatnonzero(ranges["cls"] == cid)[0])
        return int(ranges["a"][i]), int(ranges["b"][i])

    def _labels(self, p: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(valid mask, int64 labels) of image heads; invalid ones are listed as corrupt."""
        keys, offs = self.reader.key_array[p], self.reader.offset_array[p]
        ok = self.sound(p, h)
        values = np.where(h["flag"] == 0, h["label"], h["l0"]).astype(np.float64)
        limit = FLOAT32_EXACT_LIMIT if self.num_classes is None else min(self.num_classes, FLOAT32_EXACT_LIMIT)
        good = valid_class_ids(values, limit)
        for i in np.flatnonzero(ok & ~good).tolist():
            value = float(values[i])
            if not np.isfinite(value) or value != int(value) or value < 0:
                bad = f"label {value!r} is not a non-negative integer class id"
            elif value >= FLOAT32_EXACT_LIMIT:
                bad = f"label {int(value)} is at or above 2**24 (float32 labels are not exact there)"
            else:
                bad = f"label {int(value)} is not below num_classes={self.num_classes}"
            self.flag_corrupt(int(keys[i]), int(offs[i]), f"{self.where(int(keys[i]), int(offs[i]))}: {bad}")
        ok &= good
        return ok, np.where(ok, values, 0).astype(np.int64)

    def _check_images(self, p: np.ndarray, h: np.ndarray, ranges: dict[str, np.ndarray] | None,
                      counts: np.ndarray, mismatch: dict[int, list[int]]) -> np.ndarray:
        ok, labels = self._labels(p, h)
        keys = self.reader.key_array[p]
        if self.deep:
            ok &= self._decode(p, ok)
        if ranges is not None and len(ranges["a"]):
            j = np.searchsorted(ranges["a"], keys, side="right") - 1
            jj = np.clip(j, 0, None)
            covered = ok & (j >= 0) & (keys < ranges["b"][jj])
            wrong = covered & (labels != ranges["cls"][jj])
            if wrong.any():
                # legacy ranges past 2**24: a key in the float32 rounding bucket of a boundary may be
                # either side of it
                f = keys.astype(np.float32)
                loose = ~ranges["exact"][jj] & ((f == ranges["a"][jj].astype(np.float32))
                                               | (f == ranges["b"][jj].astype(np.float32)))
                wrong &= ~loose
            for i in np.flatnonzero(wrong).tolist():
                ikey = int(ranges["ikey"][jj[i]])
                if ikey in mismatch:
                    mismatch[ikey][2] += 1
                else:
                    mismatch[ikey] = [int(keys[i]), int(labels[i]), 1]
        self.report["images"] += int(ok.sum())
        self.report["checked"] += len(p)
        top = int(labels[ok].max()) + 1 if ok.any() else 0
        if top > len(counts):
            counts = np.concatenate([counts, np.zeros(top - len(counts), dtype=np.int64)])
        counts += np.bincount(labels[ok], minlength=len(counts))
        return counts

    def _decode(self, p: np.ndarray, ok: np.ndarray) -> np.ndarray:
        """--deep: read each sound image record whole and decode it."""
        sizes: dict[str, int] = self.report["image_sizes"]
        good = np.ones(len(p), dtype=bool)
        for i in np.flatnonzero(ok).tolist():
            key, off = int(self.reader.key_array[p[i]]), int(self.reader.offset_array[p[i]])
            try:
                _, payload = unpack(self.reader.read(key))
                hh, ww = decode_check(payload)
            except (RecordIOError, ValueError) as exc:
                self.flag_corrupt(key, off, f"{self.where(key, off)}: {exc}")
                good[i] = False
                continue
            self.report["decoded"] += 1
            sizes[f"{hh}x{ww}"] = sizes.get(f"{hh}x{ww}", 0) + 1
        note_image_sizes(self.report)
        return good

    def _sampled(self, image_pos: np.ndarray | None, lo: int, n_img: int, ranges: dict[str, np.ndarray] | None,
                 counts: np.ndarray) -> np.ndarray:
        """--quick: check a random sample of image records; counts come from the index and the
        identity ranges (exact: every image key and identity record is counted, only not read)."""
        assert self.sample is not None
        rng = np.random.default_rng(self.seed)
        m = min(self.sample, n_img)
        pick = np.sort(rng.choice(n_img, size=m, replace=False)) if m else np.empty(0, np.int64)
        pos = image_pos[pick] if image_pos is not None else lo + pick
        mismatch: dict[int, list[int]] = {}
        for p, h in self.reader.iter_heads(pos):
            self._check_images(p, h, ranges, np.zeros(1, dtype=np.int64), mismatch)
        for ikey, (k, lab, cnt) in sorted(mismatch.items()):
            off = int(self.reader.offset(ikey))
            self.flag_corrupt(ikey, off, f"{self.where(ikey, off)}: identity record covers image key {k} but "
                              f"it has label {lab} ({cnt} such images in the sample)")
        keys = self.reader.key_array
        image_keys = keys[image_pos] if image_pos is not None else keys[lo:lo + n_img]
        self.report["images"] = n_img
        if ranges is None or not len(ranges["a"]):
            return counts
        sk = image_keys if self.reader.keys_increasing else np.sort(image_keys)
        per = np.searchsorted(sk, ranges["b"]) - np.searchsorted(sk, ranges["a"])
        out = np.zeros(max(int(ranges["cls"].max()) + 1, len(counts)), dtype=np.int64)
        out[ranges["cls"]] = per
        return out
