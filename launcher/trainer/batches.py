"""The trainer's view of its data: an endless, resumable stream of (images, labels) batches per rank.

``data.prefix`` (``--data``) is taken as users give it (:func:`resolve_prefix`): a dataset PREFIX, a
``.rec``/``.idx`` path, a folder holding ``train.rec`` (insightface's layout), or an image folder with
one subfolder per identity, which is packed once (``pfc data pack`` semantics, resized to
``model.image_size``) into the run's data cache ``OUTPUT/data_cache/train`` and reused while the
folder is unchanged.

The data position is a pure function of the optimizer step (``step * grad_accum`` batches of this
rank consumed), because every rank reads an equal-length, reproducible part of each epoch
(``data_pipeline.dataset.shard_plan``). Resuming at step n therefore needs no loader state.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.insightface import InsightFaceReader, property_path, read_property
from data_pipeline.recordio import RecordIOError
from launcher.config import Config
from launcher.distributed import DistContext
from launcher.errors import DataError
from launcher.trainer.augment import BatchAugment, build_augment

log = logging.getLogger("pfc")


@dataclass
class Pixels:
    """uint8 pixels (B, H, W, 3) and the flips (B,) bool still to apply, for loaders that leave the
    mirroring to the training step (DALI: its CPU ``fn.flip`` costs a quarter of a decode)."""

    pixels: torch.Tensor
    flips: torch.Tensor | None


def to_model_input(images: torch.Tensor | Pixels, device: torch.device, channels_last: bool = False,
                   flips: torch.Tensor | None = None,
                   augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """A loader's batch -> the backbone's input: float32 (B, 3, H, W) in [-1, 1] on ``device``.

    ``images`` is uint8, (B, H, W, 3) as the loaders hand it over or (B, 3, H, W), or already float
    (B, 3, H, W) in [-1, 1] (then it is only moved). The uint8 batch crosses to the device first (a
    quarter of the bytes of float32; non-blocking from pinned memory) and is converted there as
    x / 127.5 - 1, the formula of the former loader-side conversion (``data_pipeline.dataset.to_unit``),
    so that a CPU run's inputs are bit-identical to it. ``flips`` (B,) bool mirrors the marked images
    left-right on the device, for loaders that leave the flip to the step. ``augment`` (the step's
    :class:`launcher.trainer.augment.BatchAugment`, bound to its step) then augments the normalised batch on the
    device. With ``channels_last`` the result has channels-last strides (an (B, H, W, 3) batch already
    has them: no copy). A :class:`Pixels` carries its own flips.
    """
    if isinstance(images, Pixels):
        flips = images.flips
        images = images.pixels
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        if images.dim() != 4 or 3 not in (images.shape[1], images.shape[3]):
            raise ValueError(f"expected uint8 images (B, H, W, 3) or (B, 3, H, W), got {tuple(images.shape)}")
        chw = images.permute(0, 3, 1, 2) if images.shape[3] == 3 and images.shape[1] != 3 else images
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = chw.contiguous(memory_format=fmt).float().div_(127.5).sub_(1.0)
    elif images.is_floating_point():
        out = images.contiguous(memory_format=torch.channels_last) if channels_last else images
    else:
        raise ValueError(f"expected uint8 or float images, got {images.dtype}")
    if flips is not None:
        flips = flips.to(device, non_blocking=True).bool()
        if bool(flips.any()):
            out = torch.where(flips.view(-1, 1, 1, 1), out.flip(3), out)
    if augment is not None:
        out = augment(out)
        if channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
    return out


class DeviceSyntheticLoader:
    """Random uint8 images and labels made directly on the device (``data.loader=synthetic``).

    For benchmarks of the backbone and head without any input pipeline (``pfc bench train
    --device-data``): no file, no decode, no host-to-device copy. Batches are (B, H, W, 3) uint8 as the
    real loaders give, reproducible from (seed, rank, epoch, batch); ``per_rank`` images per epoch.
    """

    def __init__(self, batch_size: int, image_size: int, num_classes: int, rank: int, seed: int,
                 device: torch.device, per_rank: int = 1 << 20) -> None:
        self.batch_size, self.image_size, self.num_classes = batch_size, image_size, num_classes
        self.rank, self.seed, self.device, self.per_rank = rank, seed, device, per_rank
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        self.epoch, self.start = epoch, start_index

    def __iter__(self) -> Any:
        gen = torch.Generator(device=self.device)
        for b in range(self.start // self.batch_size, self.per_rank // self.batch_size):
            gen.manual_seed(hash((self.seed, self.rank, self.epoch, b)) & 0x7FFF_FFFF)
            s = self.image_size
            images = torch.randint(0, 256, (self.batch_size, s, s, 3), generator=gen, dtype=torch.uint8,
                                   device=self.device)
            labels = torch.randint(0, self.num_classes, (self.batch_size,), generator=gen, device=self.device)
            yield images, labels


def choose_loader(requested: str, device: torch.device) -> str:
    """``auto``: DALI on GPUs when installed (mixed decode), the torch loader otherwise."""
    from data_pipeline.dali_iterator import dali_available

    if requested == "dali":
        if not dali_available():
            raise DataError("data.loader=dali but NVIDIA DALI is not installed: "
                            "pip install 'partialfc-discface[dali]', or set data.loader=torch")
        return "dali"
    if requested == "auto":
        return "dali" if (device.type == "cuda" and dali_available()) else "torch"
    return "torch"


class TrainData:
    """The rank's batches (:meth:`next_batch`), its position by step, and the batch augmentation of
    each step (:meth:`augmentation`, None when ``data.augment`` is all off)."""

    def __init__(self, loader: Any, batch_size: int, micro_per_step: int, num_classes: int, kind: str,
                 augment: BatchAugment | None = None) -> None:
        self.loader = loader
        self.augment = augment
        self.batch_size = batch_size
        self.micro_per_step = micro_per_step
        self.num_classes = num_classes
        self.kind = kind
        per_rank = loader.per_rank if hasattr(loader, "per_rank") else loader.sampler.per_rank
        self.batches_per_epoch = per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise DataError(f"each rank has {per_rank} images per epoch, fewer than one batch of {batch_size}: "
                            "lower train.batch_size or use more data")
        self.epoch = 0
        self._it: Any = None

    def augmentation(self, step: int, micro: int = 0) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The augmentation of micro-batch ``micro`` of optimizer step ``step`` (drawn from the seed, step,
        micro and rank: an exact resume draws the same), for :func:`to_model_input`."""
        return None if self.augment is None else self.augment.at(step, micro)

    def position(self, step: int) -> dict[str, int]:
        consumed = step * self.micro_per_step
        return {"epoch": consumed // self.batches_per_epoch,
                "batch_in_epoch": consumed % self.batches_per_epoch, "batch_size": self.batch_size}

    def seek(self, step: int) -> None:
        pos = self.position(step)
        self.epoch = pos["epoch"]
        self.loader.set_epoch(self.epoch, pos["batch_in_epoch"] * self.batch_size)
        self._it = iter(self.loader)

    def next_batch(self) -> tuple[torch.Tensor | Pixels, torch.Tensor]:
        """(images, labels); images as the loader gave them, or :class:`Pixels` when it left flips to
        the step (a loader yielding (pixels, labels, flips)): :func:`to_model_input` takes either."""
        if self._it is None:
            self.seek(0)
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch += 1
            self.loader.set_epoch(self.epoch, 0)
            self._it = iter(self.loader)
            batch = next(self._it)
        if len(batch) == 3:
            return Pixels(batch[0], batch[2]), batch[1]
        return batch[0], batch[1]

    @property
    def skipped_records(self) -> int:
        return int(getattr(self.loader, "skipped", 0))

    def close(self) -> None:
        self._it = None
        close = getattr(self.loader, "close", None)
        if close is not None:
            close()


def _index_mismatch(prefix: Path, err: RecordIOError) -> DataError:
    return DataError(f"the index {prefix}.idx does not match {prefix}.rec (or the .rec is damaged): {err}; "
                     "use the .idx written together with this .rec, or rebuild it")


def open_checked(prefix: Path, samples: int = 8, seed: int = 0) -> InsightFaceReader:
    """Open the dataset and refuse a ``.idx`` that does not belong to its ``.rec``, before anything trains.

    Cheap: reads a few whole records through the index -- the first and the last by offset, and
    ``samples`` more at random. Each must start with the RecordIO magic at its offset and end within
    the file, so an index of another file, or one with offsets past the end, fails here, not mid-run.
    """
    has_idx = Path(f"{prefix}.idx").is_file()
    try:
        reader = InsightFaceReader(prefix)  # reads the header record (key 0) through the index
    except RecordIOError as e:
        raise (_index_mismatch(prefix, e) if has_idx else e) from None
    if not has_idx:
        return reader  # keys and offsets came from scanning the .rec itself
    records = reader.reader
    keys, offsets = records.key_array, records.offset_array
    if len(keys):
        # first and last by offset without sorting (O(n), no n-sized temporary at 42M records)
        picks = {int(keys[int(np.argmin(offsets))]), int(keys[int(np.argmax(offsets))])}
        rng = np.random.default_rng(seed)
        picks.update(int(keys[i]) for i in rng.choice(len(keys), size=min(samples, len(keys)), replace=False))
        for key in sorted(picks):
            try:
                records.read(key)
            except RecordIOError as e:
                reader.close()
                raise _index_mismatch(prefix, e) from None
    return reader


def check_val_bins(cfg: Config) -> None:
    """Missing verification sets are reported before training, not at the first evaluation."""
    missing = [b for b in cfg.data.val_bins if not Path(b).is_file()]
    if missing:
        raise FileNotFoundError(f"data.val_bins: no such file: {', '.join(missing)}")


#: the run's data cache: image folders given as data.prefix are packed here (OUTPUT/data_cache/train)
DATA_CACHE = "data_cache"
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
    prefix = cache / "train"
    record = cache / "source.json"
    lock = cache.with_name(cache.name + ".lock")
    want = _fingerprint(src, image_size)
    while True:
        if record.is_file():
            saved = json.loads(record.read_text())
            if saved == want:
                log.info(f"data: {src} already packed in {cache}")
                return prefix
            raise ValueError(f"data.prefix {src}: the run's data cache {cache} was packed from {saved.get('source')} "
                             f"({saved.get('files')} images, {saved.get('image_size')} px), not from this folder as "
                             f"it is now ({want['files']} images, {image_size} px): delete {cache} to repack it, "
                             "or train into another --output")
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
        summary = pack_dataset(src, tmp / "train", resize=True, image_size=(image_size, image_size),
                               progress=False)
        if summary["skipped"]:
            log.warning(f"data: {len(summary['skipped'])} unreadable images skipped while packing {src}, "
                        f"first: {summary['skipped'][0]['path']}: {summary['skipped'][0]['error']}")
        (tmp / "pack.json").write_text(json.dumps({**summary, "packed_by_pid": os.getpid()}, indent=2) + "\n")
        (tmp / "source.json").write_text(json.dumps(want) + "\n")  # last: marks the pack complete
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


def load_data(cfg: Config, ctx: DistContext) -> TrainData:
    if cfg.data.loader == "synthetic":
        if cfg.head.num_classes is None:
            raise ValueError("data.loader=synthetic makes its own labels: set head.num_classes")
        synth = DeviceSyntheticLoader(cfg.train.batch_size, cfg.model.image_size, cfg.head.num_classes,
                                      ctx.rank, cfg.train.seed, ctx.device)
        log.info(f"data: random uint8 batches made on {ctx.device} ({cfg.head.num_classes} classes)")
        return TrainData(synth, cfg.train.batch_size, cfg.optim.grad_accum, cfg.head.num_classes, "synthetic",
                         augment=build_augment(cfg.data.augment, cfg.train.seed, ctx.rank))
    if not cfg.data.prefix:
        raise DataError("no training data: set data.prefix (or pass --data PREFIX); "
                        "`pfc data synth` makes a synthetic set")
    prefix = resolve_prefix(cfg.data.prefix, cfg.output, cfg.model.image_size)
    check_val_bins(cfg)
    num_classes, h, w = read_property(prefix)
    if num_classes < 2:
        raise DataError(f"{property_path(prefix)}: the dataset {prefix} has {num_classes} identity; a classifier "
                        "head needs at least 2 classes (add identities, or check the property file)")
    if cfg.head.num_classes is not None:
        if cfg.head.num_classes < num_classes:
            raise DataError(f"head.num_classes={cfg.head.num_classes} but the dataset {prefix} has "
                            f"{num_classes} classes (its property file): labels would fall outside the head")
        num_classes = cfg.head.num_classes
    if (h, w) != (cfg.model.image_size, cfg.model.image_size):
        raise DataError(f"model.image_size={cfg.model.image_size} but {prefix} holds {h}x{w} images "
                        "(its property file); set model.image_size to match")
    kind = choose_loader(cfg.data.loader, ctx.device)
    reader = open_checked(prefix, seed=cfg.train.seed)
    if kind == "dali":
        from data_pipeline.dali_iterator import DaliLoader

        loader: Any = DaliLoader(reader, cfg.train.batch_size, ctx.rank, ctx.world_size, cfg.train.seed,
                                 threads=max(cfg.data.workers, 1),
                                 device_id=ctx.device.index if ctx.device.type == "cuda" else None,
                                 flip=cfg.data.flip_probability(), uint8=True)
    else:
        from data_pipeline.dataset import build_dataloader

        loader = build_dataloader(reader, cfg.train.batch_size, ctx.rank, ctx.world_size, cfg.train.seed,
                                  cfg.data.workers, flip=cfg.data.flip_probability(),
                                  skip_corrupt=cfg.data.skip_corrupt, pin_memory=ctx.device.type == "cuda",
                                  uint8=True)
    log.info(f"data: {prefix} ({len(reader)} images, {num_classes} classes, {h}x{w}) via the {kind} loader")
    augment = build_augment(cfg.data.augment, cfg.train.seed, ctx.rank)
    if augment is not None:
        log.info(f"data: augmentation on {ctx.device} in the step: {describe_augment(cfg)}")
    return TrainData(loader, cfg.train.batch_size, cfg.optim.grad_accum, num_classes, kind, augment=augment)


def describe_augment(cfg: Config) -> str:
    """The ops that can fire and their probabilities, for the log (``flip 0.5, crop 0.5, ...``)."""
    a = cfg.data.augment
    ops = [("crop", a.crop.p), ("shift", a.shift.p), ("rotation", a.rotation.p), ("color", a.color.p),
           ("grayscale", a.grayscale.p), ("erasing", a.erasing.p)]
    return ", ".join(f"{k} {p:g}" for k, p in [("flip", cfg.data.flip_probability()), *ops] if p > 0)
