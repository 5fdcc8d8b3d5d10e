"""Dataset integrity check behind ``pfc data inspect``.

Every record listed by the ``.idx`` (or found by scanning the ``.rec``) is read and checked: chunk
magic and lengths (by the reader), the IRHeader and its labels, the insightface header and identity
records, and with ``deep`` that every image payload decodes. Problems with one record are listed by
key and byte offset; problems with the dataset as a whole (a missing property file, an unreadable
index) are listed as errors.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from data_pipeline.insightface import FLOAT32_EXACT_LIMIT, _with_suffix, read_property
from data_pipeline.recordio import RecordIOError, RecordReader, unpack

__all__ = ["decode_check", "format_report", "inspect_dataset"]


def decode_check(payload: bytes) -> tuple[int, int]:
    """Fully decode an encoded image with Pillow; returns (h, w). Raises ValueError if it does not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(payload)) as im:
            im.load()  # open() only parses the header; load() runs the whole decoder
            return im.height, im.width
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for bad data
        raise ValueError(f"payload of {len(payload)} bytes is not a decodable image "
                         f"({type(exc).__name__}: {exc})") from None


def _corrupt(key: int, offset: int | None, error: str) -> dict[str, Any]:
    return {"key": int(key), "offset": None if offset is None else int(offset), "error": error}


def inspect_dataset(prefix: str | os.PathLike[str], deep: bool = False, progress: bool = False
                    ) -> dict[str, Any]:
    """Check every record of ``PREFIX.rec`` and summarise the dataset (a JSON-ready dict).

    Keys: ``ok`` (no corrupt record and no error), ``records``, ``images``, ``identities``
    (classes with at least one image), ``num_classes`` (from the property file),
    ``images_per_identity`` (min/max/mean/median), ``header`` ([id_start, id_end] or None),
    ``corrupt`` (list of ``{"key", "offset", "error"}``), ``errors`` and ``warnings`` (strings),
    ``decoded`` (images that decoded, with ``deep``), ``image_sizes`` (with ``deep``: {"HxW": n}).
    """
    rec_path = _with_suffix(prefix, ".rec")
    idx_path = _with_suffix(prefix, ".idx")
    report: dict[str, Any] = {
        "prefix": str(prefix), "rec": str(rec_path), "idx": str(idx_path) if idx_path.is_file() else None,
        "deep": deep, "records": 0, "images": 0, "identities": 0, "num_classes": None, "image_size": None,
        "header": None, "images_per_identity": None, "corrupt": [], "errors": [], "warnings": [],
        "decoded": 0, "image_sizes": {},
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
        keys = reader.keys
        report["records"] = len(keys)
        header: tuple[int, int] | None = None
        if 0 in reader:
            try:
                head, _ = unpack(reader.read(0))
                if head.flag > 0:
                    lab = np.asarray(head.label)
                    if lab.size >= 2:
                        header = (int(lab[0]), int(lab[1]))
            except RecordIOError:
                pass  # reported with the other records below
        report["header"] = list(header) if header is not None else None
        if header is not None and num_classes is not None and header[1] - header[0] != num_classes:
            warnings.append(f"header record lists {header[1] - header[0]} identity records "
                            f"([{header[0]}, {header[1]})) but the property says {num_classes} classes")

        labels: dict[int, int] = {}
        ranges: dict[int, tuple[int, int, int]] = {}  # class -> (first, end, identity record key)
        sizes: dict[str, int] = {}
        bar = _progress(len(keys), progress)
        for key in keys:
            bar.update(1)
            offset = reader.offset(key)
            try:
                head, payload = unpack(reader.read(key))
            except RecordIOError as exc:
                corrupt.append(_corrupt(key, offset, str(exc.with_context(path=rec_path, key=key,
                                                                           offset=offset))))
                continue
            where = f"{rec_path}, record key {key}, byte offset {offset}"
            if header is not None and key == 0:
                continue
            if header is not None and header[0] <= key < header[1]:
                lab = np.asarray(head.label).ravel()
                if head.flag < 2 or lab.size < 2 or payload:
                    corrupt.append(_corrupt(key, offset, f"{where}: identity record must have a 2-float "
                                            f"label [first, end) and no payload (flag {head.flag})"))
                    continue
                a, b = int(lab[0]), int(lab[1])
                if not 1 <= a <= b <= header[0]:
                    corrupt.append(_corrupt(key, offset, f"{where}: identity record range [{a}, {b}) is not "
                                            f"inside the image keys [1, {header[0]})"))
                    continue
                ranges[key - header[0]] = (a, b, key)
                continue
            if header is not None and not 1 <= key < header[0]:
                warnings.append(f"{where}: key outside the layout's image and identity ranges")
            # insightface's convention: a multi-label image record carries its class id first
            first = np.asarray(head.label, dtype=np.float64).ravel()
            value = float(first[0]) if first.size else float("nan")
            bad = None
            if not np.isfinite(value) or value != int(value) or value < 0:
                bad = f"label {value!r} is not a non-negative integer class id"
            elif value >= FLOAT32_EXACT_LIMIT:
                bad = f"label {int(value)} is at or above 2**24 (float32 labels are not exact there)"
            elif num_classes is not None and value >= num_classes:
                bad = f"label {int(value)} is not below num_classes={num_classes}"
            if bad is not None:
                corrupt.append(_corrupt(key, offset, f"{where}: {bad}"))
                continue
            if deep:
                try:
                    hh, ww = decode_check(payload)
                except ValueError as exc:
                    corrupt.append(_corrupt(key, offset, f"{where}: {exc}"))
                    continue
                report["decoded"] += 1
                sizes[f"{hh}x{ww}"] = sizes.get(f"{hh}x{ww}", 0) + 1
            labels[key] = int(value)
        bar.close()

    # identity records must agree with the labels of the images they cover
    for cid, (a, b, ikey) in sorted(ranges.items()):
        wrong = [k for k in range(a, b) if k in labels and labels[k] != cid]
        if wrong:
            k, off = wrong[0], reader.offset(ikey)
            corrupt.append(_corrupt(ikey, off,
                                    f"{rec_path}, record key {ikey}, byte offset {off}: identity record for "
                                    f"class {cid} covers image keys [{a}, {b}) but image key {k} has label "
                                    f"{labels[k]} ({len(wrong)} such images)"))
    counts = np.bincount(np.fromiter(labels.values(), dtype=np.int64, count=len(labels))) if labels else \
        np.zeros(0, dtype=np.int64)
    present = counts[counts > 0]
    report["images"] = len(labels)
    report["identities"] = int(present.size)
    if present.size:
        report["images_per_identity"] = {"min": int(present.min()), "max": int(present.max()),
                                         "mean": float(present.mean()), "median": float(np.median(present))}
    if num_classes is not None and present.size < num_classes:
        warnings.append(f"{num_classes - int(present.size)} of {num_classes} classes have no images")
    if deep:
        report["image_sizes"] = sizes
        if report["image_size"] is not None and sizes:
            want = f"{report['image_size'][0]}x{report['image_size'][1]}"
            other = sum(n for s, n in sizes.items() if s != want)
            if other:
                warnings.append(f"{other} images are not {want} as the property file says")
    report["corrupt"] = sorted(corrupt, key=lambda c: (c["offset"] is None, c["offset"] or 0, c["key"]))
    report["ok"] = not corrupt and not errors
    return report


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="rec", desc="checking", dynamic_ncols=True, disable=not enabled)


def format_report(report: dict[str, Any]) -> str:
    """Human summary of :func:`inspect_dataset`'s report."""
    lines = [f"dataset     {report['prefix']}"]
    if report["num_classes"] is not None:
        lines.append(f"property    {report['num_classes']} classes, {report['image_size'][0]}x"
                     f"{report['image_size'][1]}")
    lines.append(f"records     {report['records']}"
                 + (f" (header: identity records [{report['header'][0]}, {report['header'][1]}))"
                    if report["header"] else ""))
    lines.append(f"images      {report['images']}")
    lines.append(f"identities  {report['identities']}")
    ipi = report["images_per_identity"]
    if ipi:
        lines.append(f"per identity min {ipi['min']}  max {ipi['max']}  mean {ipi['mean']:.2f}  "
                     f"median {ipi['median']:g}")
    if report["deep"]:
        lines.append(f"decoded     {report['decoded']} images"
                     + (f" ({', '.join(f'{s}: {n}' for s, n in report['image_sizes'].items())})"
                        if report["image_sizes"] else ""))
    for w in report["warnings"]:
        lines.append(f"warning     {w}")
    for e in report["errors"]:
        lines.append(f"error       {e}")
    if report["corrupt"]:
        lines.append(f"CORRUPT     {len(report['corrupt'])} records:")
        for c in report["corrupt"][:50]:
            lines.append(f"  key {c['key']} at byte offset {c['offset']}: {c['error']}")
        if len(report["corrupt"]) > 50:
            lines.append(f"  ... and {len(report['corrupt']) - 50} more (see --json)")
    lines.append("status      " + ("OK" if report["ok"] else "FAILED"))
    return "\n".join(lines)

