"""Pack an image folder or an im2rec ``.lst`` into the insightface RecordIO layout.

Sources:

* a folder with one subfolder per identity (class ids follow the sorted subfolder names);
* an im2rec ``.lst`` file: ``index<TAB>label[<TAB>label...]<TAB>relative/path`` per line, paths
  relative to the ``.lst``'s folder (or ``root``); the first label is the class id, and class ids
  are renumbered densely (0..C-1 in sorted order) when they are not already.

Every image is decoded with Pillow, converted to RGB, optionally resized to ``image_size`` (112x112 by
default; ``pfc data pack --image-size N``, and ``model.image_size`` when a run packs an image folder;
:data:`RESAMPLE`, bilinear) and encoded as JPEG (quality 95 by default). Unreadable images are skipped
and listed in the summary; 16-bit grey images are scaled to 8 bits and an EXIF orientation is applied (:func:`rgb8`).
"""

from __future__ import annotations

import io
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_pipeline.insightface import FLOAT32_EXACT_LIMIT, InsightFaceWriter
from data_pipeline.progress_bar import progress_bar

__all__ = ["IMAGE_EXTENSIONS", "RESAMPLE", "encode_image", "list_sources", "pack_dataset", "rgb8"]

# Pillow's bilinear (antialiased when shrinking): what the verification .bin images (pfc train's evaluation,
# pfc eval) and embed_images' image files are resized with, so a model is evaluated on faces resized as its
# training faces were; insightface's packers (im2rec, face2rec2's alignment) resize with OpenCV's bilinear too.
RESAMPLE = Image.Resampling.BILINEAR

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}


def list_folder(src: Path) -> list[tuple[str, list[Path]]]:
    """``[(identity name, [image paths])]`` of a folder with one subfolder per identity, sorted."""
    ids = []
    for d in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if files:
            ids.append((d.name, files))
    return ids


def list_lst(lst: Path, root: Path | None = None) -> list[tuple[str, list[Path]]]:
    """Identities of an im2rec ``.lst``, grouped by the first label, in sorted label order."""
    base = root if root is not None else lst.parent
    groups: dict[float, list[Path]] = {}
    for lineno, raw in enumerate(lst.read_text().splitlines(), start=1):
        if not raw.strip():
            continue
        parts = raw.split("\t")
        if len(parts) < 3:
            raise ValueError(f"{lst}: line {lineno} is {raw[:80]!r}; expected "
                             "'index<TAB>label<TAB>path' (tab-separated, im2rec format)")
        try:
            label = float(parts[1])
        except ValueError:
            raise ValueError(f"{lst}: line {lineno}: label {parts[1]!r} is not a number") from None
        groups.setdefault(label, []).append(base / parts[-1])
    return [(f"{lab:g}", paths) for lab, paths in sorted(groups.items())]


def list_sources(src: str | os.PathLike[str], root: str | os.PathLike[str] | None = None
                 ) -> list[tuple[str, list[Path]]]:
    """Identities and their image files from a folder or a ``.lst``."""
    path = Path(src)
    if path.is_dir():
        return list_folder(path)
    if path.is_file() and path.suffix == ".lst":
        return list_lst(path, None if root is None else Path(root))
    raise ValueError(f"{path}: expected a folder with one subfolder per identity or an im2rec .lst file")


def check_pack_size(src: str | os.PathLike[str], identities: int) -> None:
    """Refuse a source the insightface layout cannot hold, before anything is encoded.

    Class ids are float32 labels, exact only below 2**24, so at most 2**24 identities. The number
    of images is not limited: past 2**24 records the key ranges also go into the records' uint64
    id/id2 fields (see :mod:`data_pipeline.insightface`)."""
    if identities > FLOAT32_EXACT_LIMIT:
        raise ValueError(f"{src}: {identities} identities; the insightface layout stores class ids as float32 "
                         f"labels, exact only up to 2**24 = {FLOAT32_EXACT_LIMIT} classes")


# EXIF orientation -> the transpose that shows the image upright (EXIF 2.3, tag 0x0112)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def _upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation says. Not Pillow's ``ImageOps.exif_transpose``: it also
    rewrites the EXIF block, and a tag of an unexpected type in a camera's block makes that raise
    (struct.error, TypeError, ZeroDivisionError), which would stop a whole pack for one photo's metadata."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a malformed block raises many types: the pixels as stored
        return img
    method = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    return img.transpose(method) if method is not None else img


def rgb8(img: Image.Image, path: str | os.PathLike[str]) -> Image.Image:
    """A PIL image as 8-bit RGB, upright. 16-bit grey (PNG, TIFF: mode I;16; PGM: I) is scaled to 8 bits,
    which Pillow's convert("RGB") does not do: it clips at 255, so a 16-bit face would come out nearly
    white. An EXIF orientation (a phone's photo) is applied, as image viewers and OpenCV's imread (which
    insightface's tools read with) do. A floating-point image, or integers outside 0..65535, is a
    ValueError naming ``path``."""
    img = _upright(img)
    if img.mode.startswith("I;16") or img.mode == "I":
        grey = np.asarray(img, dtype=np.int32)  # 16-bit values and their * 255 fit
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise ValueError(f"{path}: {img.mode} pixel values {grey.min()}..{grey.max()}; expected an 8- or "
                             "16-bit image (0..65535)")
        img = Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif img.mode == "F":
        raise ValueError(f"{path}: a floating-point image (mode F); expected an 8- or 16-bit image")
    return img.convert("RGB")


def encode_image(path: Path, *, size: tuple[int, int] | None, quality: int) -> tuple[bytes, tuple[int, int]]:
    """JPEG bytes of one image (8-bit RGB, :func:`rgb8`; optionally resized to ``size`` = (h, w)) and its
    final (h, w)."""
    with Image.open(path) as im:
        rgb = rgb8(im, path)
    if size is not None and (rgb.height, rgb.width) != size:
        rgb = rgb.resize((size[1], size[0]), RESAMPLE)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), (rgb.height, rgb.width)


def pack_dataset(src: str | os.PathLike[str], out_prefix: str | os.PathLike[str], *, resize: bool = True,
                 quality: int = 95, image_size: tuple[int, int] = (112, 112), progress: bool = True,
                 root: str | os.PathLike[str] | None = None, workers: int | None = None) -> dict[str, Any]:
    """Write ``OUT_PREFIX.rec/.idx`` and the property file from ``src``; returns a summary dict.

    Summary keys: ``images``, ``identities``, ``skipped`` (list of ``{"path", "error"}``),
    ``image_size`` ([h, w] written to the property file), ``mixed_sizes`` (True when ``resize`` is
    off and the images differ in size), ``rec``, ``idx``, ``property``, ``seconds``,
    ``images_per_identity`` (min/max/mean). ``workers``: encoding threads (Pillow releases the GIL
    while decoding, resizing and encoding), default ``min(4, cpu count)``; the output does not depend
    on it.
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    t0 = time.perf_counter()
    identities = list_sources(src, root)
    if not identities:
        raise ValueError(f"{src}: no images found (expected one subfolder of images per identity, or a .lst)")
    check_pack_size(src, len(identities))
    total = sum(len(files) for _, files in identities)
    target = (int(image_size[0]), int(image_size[1])) if resize else None
    skipped: list[dict[str, str]] = []
    sizes: set[tuple[int, int]] = set()
    per_identity: list[int] = []
    # the property needs the size before close(); without resize it is the first image's size
    writer: InsightFaceWriter | None = None
    first_size: tuple[int, int] | None = None
    bar = progress_bar(total, progress, unit="img", desc="packing")
    finished = False
    try:
        for _name, files, results in _encoded_in_order(identities, target, quality, workers):
            encoded = []
            for f, res in zip(files, results, strict=True):
                if isinstance(res, str):
                    skipped.append({"path": str(f), "error": res})
                else:
                    data, hw = res
                    encoded.append(data)
                    sizes.add(hw)
                    first_size = first_size or hw
                bar.update(1)
            if not encoded:
                continue
            if writer is None:
                assert first_size is not None
                writer = InsightFaceWriter(out_prefix, image_size=target or first_size)
            writer.add_identity(encoded)
            per_identity.append(len(encoded))
        finished = True
    finally:
        bar.close()
        if writer is not None:
            # an interrupted pack leaves no property file, so nothing takes it for a whole dataset
            if finished:
                writer.close()
            else:
                writer.abort()
    if writer is None:
        raise ValueError(f"{src}: none of the {total} images could be read; first error: "
                         f"{skipped[0]['error'] if skipped else 'n/a'}")
    n = sum(per_identity)
    return {
        "source": str(src),
        "rec": str(writer.rec_path),
        "idx": str(writer.idx_path),
        "property": str(writer.property_path),
        "images": n,
        "identities": len(per_identity),
        "images_per_identity": {"min": min(per_identity), "max": max(per_identity),
                                "mean": n / len(per_identity)},
        "image_size": list(writer.image_size),
        "mixed_sizes": len(sizes) > 1,
        "quality": quality,
        "resized": resize,
        "skipped": skipped,
        "seconds": time.perf_counter() - t0,
    }


def _encode_or_error(path: Path, size: tuple[int, int] | None,
                     quality: int) -> tuple[bytes, tuple[int, int]] | str:
    try:
        return encode_image(path, size=size, quality=quality)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _encoded_in_order(identities: list[tuple[str, list[Path]]], size: tuple[int, int] | None, quality: int,
                      workers: int | None) -> Iterator[tuple[str, list[Path], list[Any]]]:
    """Per identity, its files and their encodings (or error strings), in input order; encoding runs in
    a thread pool with a bounded window of outstanding images, so memory stays flat on big sources."""
    n_workers = max(1, workers if workers is not None else min(4, os.cpu_count() or 1))
    window = 64 * n_workers
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        pending: deque[Future[Any]] = deque()
        flat = ((i, f) for i, (_, files) in enumerate(identities) for f in files)
        current: list[Any] = []
        cur_id = 0
        exhausted = False
        while True:
            while not exhausted and len(pending) < window:
                nxt = next(flat, None)
                if nxt is None:
                    exhausted = True
                    break
                pending.append(pool.submit(_encode_or_error, nxt[1], size, quality))
            if not pending:
                break
            current.append(pending.popleft().result())
            while cur_id < len(identities) and len(current) == len(identities[cur_id][1]):
                yield identities[cur_id][0], identities[cur_id][1], current
                current = []
                cur_id += 1
