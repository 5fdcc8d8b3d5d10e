"""``data.prefix`` (``--data``) as users give it -> the dataset PREFIX (``PREFIX.rec``, ``PREFIX.idx``, property).

Accepted: a dataset PREFIX, a ``.rec``/``.idx`` path, a folder holding ``train.rec`` (insightface's layout),
or an image folder with one subfolder per identity, which is packed once (``pfc data pack`` semantics,
resized to ``model.image_size``) into the run's data cache ``OUTPUT/data_cache/train`` and reused while
the folder is unchanged. ``pfc train`` resolves it once, before any rank starts, and hands the resolved
PREFIX on as ``data.prefix``; a rank started by another launcher (srun, a PyTorchJob) resolves it itself.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("pfc")


#: the run's data cache: image folders given as data.prefix are packed here (OUTPUT/data_cache/train)
DATA_CACHE = "data_cache"
#: in the data cache: the packed dataset's PREFIX name, and the record of what it was packed from (written last)
_PACKED, _SOURCE = "train", "source.json"
#: a pack lock not touched for this long belongs to a process that is gone
PACK_LOCK_STALE_S = 60.0
_HEARTBEAT_S = 5.0


def _is_image_folder(p: Path) -> bool:
    from data_pipeline.pack import IMAGE_EXTENSIONS

    for d in p.iterdir():
        if d.is_dir() and any(f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file() for f in d.rglob("*")):
            return True
    return False


def resolve_prefix(value: str, output: str | Path, image_size: int) -> Path:
    """``data.prefix`` as given -> the dataset PREFIX (``PREFIX.rec``, ``PREFIX.idx``, property).

    Accepts a PREFIX, a ``.rec`` or ``.idx`` path, a folder holding ``train.rec``, or an image folder
    (one subfolder per identity), which is packed into ``OUTPUT/data_cache`` by :func:`pack_into_cache`.
    Raises ValueError naming ``data.prefix`` and what was expected.
    """
    p = Path(value)
    if p.suffix in (".rec", ".idx") and Path(f"{os.fspath(p)[:-4]}.rec").is_file():
        return Path(os.fspath(p)[:-4])
    if Path(f"{p}.rec").is_file():  # a PREFIX first: `faces.rec` packed beside the folder `faces/` wins
        return p
    if p.is_dir():
        if (p / "train.rec").is_file():
            return p / "train"
        if _is_image_folder(p):
            return pack_into_cache(p, Path(output) / DATA_CACHE, image_size)
        raise ValueError(f"data.prefix {p}: a folder without train.rec and without identity subfolders holding "
                         "images; expected a dataset PREFIX, a .rec/.idx file, a folder holding train.rec, or "
                         "an image folder with one subfolder per identity")
    rec = f"{os.fspath(p)[:-4]}.rec" if p.suffix in (".rec", ".idx") else f"{p}.rec"
    raise ValueError(f"data.prefix {p}: no such dataset ({rec} does not exist); expected a dataset PREFIX "
                     "(PREFIX.rec, PREFIX.idx, property), a .rec/.idx file, a folder holding train.rec, or an "
                     "image folder with one subfolder per identity")


def _fingerprint(src: Path, image_size: int) -> dict[str, Any]:
    """What the cache was packed from: the folder, its image count, bytes and newest mtime, the size."""
    from data_pipeline.pack import list_folder

    files = [f for _, fs in list_folder(src) for f in fs]
    stats = [f.stat() for f in files]
    return {"source": str(src.resolve()), "files": len(files), "bytes": sum(st.st_size for st in stats),
            "mtime_ns": max((st.st_mtime_ns for st in stats), default=0), "image_size": image_size}


def packed_from(prefix: str) -> str | None:
    """The image folder (resolved) the run's data cache PREFIX ``OUTPUT/data_cache/train`` was packed from,
    from its ``source.json``; None for any other PREFIX (or a cache without a readable record)."""
    p = Path(prefix)
    if p.name != _PACKED or p.parent.name != DATA_CACHE:
        return None
    try:
        source = json.loads((p.parent / _SOURCE).read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return source if isinstance(source, str) else None


def same_data(before: str | None, now: str | None) -> bool:
    """Whether two ``data.prefix`` values name the same data: equal, or an image folder and the data cache
    packed from it (``pfc train`` hands its ranks the cache, so a run started with the folder resumes with
    the cache's PREFIX, and the reverse for a run started by another launcher)."""
    if before == now:
        return True
    if before is None or now is None:
        return False
    return any(src is not None and src == str(Path(other).resolve())
               for src, other in ((packed_from(now), before), (packed_from(before), now)))


def describe_changes(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """What differs between two :func:`_fingerprint` records, each as ``what: <then> then, <now> now``."""
    changes = []
    for key, saved_value in saved.items():
        value = now.get(key)
        if value != saved_value:
            what, show = _FINGERPRINT_FIELDS.get(key, (key, repr))
            changes.append(f"{what}: {show(saved_value)} then, {show(value)} now")
    changes += [f"{key}: none then, {now[key]!r} now" for key in now if key not in saved]
    return "; ".join(changes)


def _mtime(ns: Any) -> str:
    import datetime

    if not isinstance(ns, int):
        return repr(ns)
    return datetime.datetime.fromtimestamp(ns / 1e9).isoformat(sep=" ", timespec="microseconds")


#: fingerprint key -> (its name in a message, how its value is shown)
_FINGERPRINT_FIELDS: dict[str, tuple[str, Any]] = {
    "source": ("folder", str),
    "files": ("images", str),
    "bytes": ("bytes of images", str),
    "mtime_ns": ("newest image modified", _mtime),
    "image_size": ("image size (model.image_size)", lambda v: f"{v} px"),
}


def _heartbeat(lock: Path, stop: threading.Event) -> None:
    while not stop.wait(_HEARTBEAT_S):
        try:
            os.utime(lock)
        except OSError:
            return


def pack_into_cache(src: Path, cache: Path, image_size: int) -> Path:
    """Pack the image folder ``src`` into ``cache/train`` once; later calls (other ranks, resumed runs)
    reuse it. Returns the PREFIX ``cache/train``.

    One process packs (it wins ``mkdir`` of ``cache.lock`` and keeps touching it); others wait for
    ``cache/source.json``, which is written last, inside a temporary folder renamed to ``cache``. A
    cache packed from another folder, or from this one before its files changed, is refused (delete it
    to repack). A lock untouched for :data:`PACK_LOCK_STALE_S` means the packer died: refused, naming it.
    """
    prefix = cache / _PACKED
    record = cache / _SOURCE
    lock = cache.with_name(cache.name + ".lock")
    want = _fingerprint(src, image_size)
    while True:
        if record.is_file():
            saved = json.loads(record.read_text())
            if saved == want:
                log.info(f"data: {src} already packed in {cache}")
                return prefix
            raise ValueError(f"data.prefix {src}: the run's data cache {cache} was packed from another folder or "
                             f"from this one before it changed ({describe_changes(saved, want)}): delete {cache} to "
                             "repack it, or train into another --output")
        try:
            lock.mkdir(parents=True)
        except FileExistsError:
            try:
                idle = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                continue  # the packer just finished (or gave up): look again
            if idle > PACK_LOCK_STALE_S:
                raise ValueError(f"data.prefix {src}: {lock} has not been touched for {idle:.0f} s: the process "
                                 f"packing {src} stopped; remove {lock} and start again") from None
            time.sleep(0.5)
            continue
        break
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, stop), daemon=True)
    beat.start()
    tmp = cache.with_name(f".{cache.name}.partial-{os.getpid()}")
    try:
        from data_pipeline.pack import pack_dataset

        for left in cache.parent.glob(f".{cache.name}.partial-*"):  # from a packer that died; we hold the lock
            shutil.rmtree(left, ignore_errors=True)
        log.info(f"data: packing image folder {src} ({want['files']} images) into {cache} at "
                 f"{image_size}x{image_size} (once; `pfc data pack` semantics)")
        summary = pack_dataset(src, tmp / _PACKED, resize=True, image_size=(image_size, image_size),
                               progress=False)
        if summary["skipped"]:
            log.warning(f"data: {len(summary['skipped'])} unreadable images skipped while packing {src}, "
                        f"first: {summary['skipped'][0]['path']}: {summary['skipped'][0]['error']}")
        (tmp / "pack.json").write_text(json.dumps({**summary, "packed_by_pid": os.getpid()}, indent=2) + "\n")
        (tmp / _SOURCE).write_text(json.dumps(want) + "\n")  # last: marks the pack complete
        if cache.exists():  # a leftover without source.json (see the loop above): incomplete, replace it
            shutil.rmtree(cache)
        os.replace(tmp, cache)
        log.info(f"data: packed {summary['images']} images of {summary['identities']} identities in "
                 f"{summary['seconds']:.1f} s")
    finally:
        stop.set()
        beat.join()
        shutil.rmtree(tmp, ignore_errors=True)
        lock.rmdir()
    return prefix
