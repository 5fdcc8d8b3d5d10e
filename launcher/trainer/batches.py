"""The trainer's view of its data: an endless, resumable stream of (images, labels) batches per rank.

``data.prefix`` (``--data``) is taken as users give it (``launcher.trainer.data_paths``).

Every rank reads an equal-length, reproducible part of each epoch (``data_pipeline.epoch_plan``), so
the data position needs no loader state: from where the run started (the checkpoint's
``data_position``, see :mod:`launcher.trainer.data_position`), each optimizer step reads ``grad_accum``
batches more, and an epoch ends when a rank's part has less than a batch left.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.insightface import InsightFaceReader, property_path, read_property
from data_pipeline.recordio import RecordIOError
from data_pipeline.verification import BinFormatError, check_bin
from launcher.config import Config
from launcher.distributed import DistContext
from launcher.errors import DataError
from launcher.trainer.augment import BatchAugment, build_augment
from launcher.trainer.data_paths import resolve_prefix
from launcher.trainer.data_position import EpochPosition, Layout, resume_position

log = logging.getLogger("pfc")


@dataclass
class Pixels:
    """uint8 pixels (B, H, W, 3) and the flips (B,) bool still to apply, for loaders that leave the
    mirroring to the training step (DALI: its CPU ``fn.flip`` costs a quarter of a decode; the torch
    loader: PIL's mirror is a tenth of one, in the workers that bound its speed)."""

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
    left-right on the device (on the uint8 pixels, before the conversion: the same values as mirroring
    after it, on a quarter of the bytes), for loaders that leave the flip to the step. ``augment`` (the
    step's :class:`launcher.trainer.augment.BatchAugment`, bound to its step) then augments the
    normalised batch on the device. With ``channels_last`` the result has channels-last strides (an
    (B, H, W, 3) batch already has them: no copy). A :class:`Pixels` carries its own flips.
    """
    if isinstance(images, Pixels):
        flips = images.flips
        images = images.pixels
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        if images.dim() != 4 or 3 not in (images.shape[1], images.shape[3]):
            raise ValueError(f"expected uint8 images (B, H, W, 3) or (B, 3, H, W), got {tuple(images.shape)}")
        chw = images.permute(0, 3, 1, 2) if images.shape[3] == 3 and images.shape[1] != 3 else images
        chw = _mirror(chw, flips)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        # by a 0-d tensor on the device, not a Python number: CUDA divides by a number as a multiplication by
        # its reciprocal, 1 ulp off the CPU loader's x / 127.5 - 1 for 111 of the 256 pixel values
        out = chw.contiguous(memory_format=fmt).float().div_(torch.full((), 127.5, device=chw.device)).sub_(1.0)
    elif images.is_floating_point():
        out = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        out = _mirror(out, flips)
    else:
        raise ValueError(f"expected uint8 or float images, got {images.dtype}")
    if augment is not None:
        out = augment(out)
        if channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
    return out


def _mirror(chw: torch.Tensor, flips: torch.Tensor | None) -> torch.Tensor:
    """(B, C, H, W) with the images marked in ``flips`` (B,) mirrored left-right (W)."""
    if flips is None:
        return chw
    flips = flips.to(chw.device, non_blocking=True).bool()
    if chw.device.type == "cpu" and not bool(flips.any()):  # a free check here; on a GPU a sync
        return chw
    return torch.where(flips.view(-1, 1, 1, 1), chw.flip(3), chw)


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
        first = self.start // self.batch_size
        for b in range(first, first + (self.per_rank - self.start) // self.batch_size):
            gen.manual_seed(hash((self.seed, self.rank, self.epoch, b)) & 0x7FFF_FFFF)
            s = self.image_size
            images = torch.randint(0, 256, (self.batch_size, s, s, 3), generator=gen, dtype=torch.uint8,
                                   device=self.device)
            labels = torch.randint(0, self.num_classes, (self.batch_size,), generator=gen, device=self.device)
            yield images, labels


def choose_loader(requested: str, device: torch.device, skip_corrupt: bool = False) -> str:
    """``auto``: DALI on GPUs when installed (mixed decode), the torch loader otherwise -- and always with
    ``skip_corrupt``, which only the torch loader honours (DALI's decoder stops at a corrupt record)."""
    from data_pipeline.dali_iterator import dali_available

    if requested == "dali":
        if not dali_available():
            raise DataError("data.loader=dali but NVIDIA DALI is not installed: "
                            "pip install 'partialfc-discface[dali]', or set data.loader=torch")
        return "dali"
    if requested == "auto":
        dali = device.type == "cuda" and dali_available()
        if dali and skip_corrupt:
            log.info("data: the torch loader, not DALI: data.skip_corrupt=true (DALI cannot skip corrupt records)")
        return "dali" if dali and not skip_corrupt else "torch"
    return "torch"


class TrainData:
    """The rank's batches (:meth:`next_batch`), its position by step, and the batch augmentation of
    each step (:meth:`augmentation`, None when ``data.augment`` is all off).

    Where a resume starts: the data position of the checkpoint it resumed from, handed over by
    :meth:`restore` (the checkpointer's ``DataPosition`` part: ``launcher.trainer.data_position.position_of``
    its meta.json)."""

    def __init__(self, loader: Any, batch_size: int, micro_per_step: int, num_classes: int, kind: str,
                 augment: BatchAugment | None = None, world_size: int | None = None) -> None:
        self.loader = loader
        self.augment = augment
        self.batch_size = batch_size
        self.micro_per_step = micro_per_step
        self.num_classes = num_classes
        self.kind = kind
        sampler: Any = getattr(loader, "sampler", None)
        per_rank = loader.per_rank if hasattr(loader, "per_rank") else sampler.per_rank
        self.batches_per_epoch = per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise DataError(f"each rank has {per_rank} images per epoch, fewer than one batch of {batch_size}: "
                            "lower train.batch_size or use more data")
        replans = sampler is not None and hasattr(sampler, "epoch_length")  # the torch loader's ShardedSampler
        self.layout = Layout(world_size or int(getattr(sampler or loader, "world_size", 1)), per_rank,
                             getattr(sampler, "num_items", None) if replans else getattr(loader, "num_items", None),
                             bool(getattr(sampler, "drop_last", False)), replans, getattr(loader, "chunk", None))
        self._saved: dict[str, Any] | None = None
        self._base, self._base_step = EpochPosition(0, 0), 0
        self.epoch = 0
        self._it: Any = None

    def augmentation(self, step: int, micro: int = 0) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The augmentation of micro-batch ``micro`` of optimizer step ``step`` (drawn from the seed, step,
        micro and rank: an exact resume draws the same), for :func:`to_model_input`."""
        return None if self.augment is None else self.augment.at(step, micro)

    def _at(self, step: int) -> EpochPosition:
        """Where the rank is after ``step``: ``grad_accum`` batches a step from where :meth:`seek` started."""
        n = (step - self._base_step) * self.micro_per_step
        if n < 0:  # before the start (not asked by the trainer): as if it had run from step 0 on these settings
            n, base = step * self.micro_per_step, EpochPosition(0, 0)
        else:
            base = self._base
        left = max(self.layout.length(base.plan) - base.start, 0) // self.batch_size  # batches of its epoch
        if n < left:
            return EpochPosition(base.epoch, base.start + n * self.batch_size, base.plan)
        n -= left
        return EpochPosition(base.epoch + 1 + n // self.batches_per_epoch,
                             n % self.batches_per_epoch * self.batch_size)

    def position(self, step: int) -> dict[str, Any]:
        """The data position after ``step`` (meta.json's ``data_position``)."""
        return self.layout.record(self._at(step), self.batch_size)

    def restore(self, saved: dict[str, Any] | None) -> None:
        """The checkpoint's data position (``data_position.position_of`` its meta.json), for :meth:`seek`."""
        self._saved = saved

    def seek(self, step: int) -> None:
        """Start reading after ``step``: at the saved position when the checkpoint of ``step`` has one, else
        at ``step`` times this run's batches."""
        saved = self._saved
        if step > 0 and saved is not None and saved.get("step", step) == step:
            pos, line = resume_position(saved, self.layout, self.kind)
            log.info(line)
        else:
            self._base, self._base_step = EpochPosition(0, 0), 0
            pos = self._at(step)
        self._base, self._base_step = pos, step
        self._set_epoch(pos)

    def _set_epoch(self, pos: EpochPosition) -> None:
        self.epoch = pos.epoch
        if pos.plan is None:
            self.loader.set_epoch(pos.epoch, pos.start)
        else:
            self.loader.set_epoch(pos.epoch, 0)
            self.loader.sampler.set_epoch(pos.epoch, pos.start, pos.plan)
        self._it = iter(self.loader)

    def next_batch(self) -> tuple[torch.Tensor | Pixels, torch.Tensor]:
        """(images, labels); images as the loader gave them, or :class:`Pixels` when it left flips to
        the step (a loader yielding (pixels, labels, flips)): :func:`to_model_input` takes either."""
        if self._it is None:
            self.seek(0)
        try:
            batch = next(self._it)
        except StopIteration:
            self._set_epoch(EpochPosition(self.epoch + 1, 0))
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
    """Verification sets that are missing, are not verification .bin files, or hold an image that cannot be
    decoded are reported before training, not at the first evaluation (each is read and decoded through,
    as the evaluation will)."""
    missing = [b for b in cfg.data.val_bins if not Path(b).is_file()]
    if missing:
        raise FileNotFoundError(f"data.val_bins: no such file: {', '.join(missing)}")
    for b in cfg.data.val_bins:
        try:
            check_bin(b)
        except BinFormatError as e:
            raise DataError(f"data.val_bins: {e}") from None


def load_data(cfg: Config, ctx: DistContext) -> TrainData:
    check_val_bins(cfg)
    if cfg.data.loader == "synthetic":
        if cfg.head.num_classes is None:  # refused with the config already; a Config built past its checks
            raise DataError("data.loader=synthetic makes random labels and reads no dataset to count classes "
                            "in: set head.num_classes")
        synth = DeviceSyntheticLoader(cfg.train.batch_size, cfg.model.image_size, cfg.head.num_classes,
                                      ctx.rank, cfg.train.seed, ctx.device)
        log.info(f"data: random uint8 batches made on {ctx.device} ({cfg.head.num_classes} classes)")
        return TrainData(synth, cfg.train.batch_size, cfg.optim.grad_accum, cfg.head.num_classes, "synthetic",
                         augment=build_augment(cfg.data.augment, cfg.train.seed, ctx.rank),
                         world_size=ctx.world_size)
    if not cfg.data.prefix:
        raise DataError("no training data: set data.prefix (or pass --data PREFIX); "
                        "`pfc data synth` makes a synthetic set")
    prefix = resolve_prefix(cfg.data.prefix, cfg.output, cfg.model.image_size)
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
    kind = choose_loader(cfg.data.loader, ctx.device, cfg.data.skip_corrupt)
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
    return TrainData(loader, cfg.train.batch_size, cfg.optim.grad_accum, num_classes, kind, augment=augment,
                     world_size=ctx.world_size)


def describe_augment(cfg: Config) -> str:
    """The ops that can fire and their probabilities, for the log (``flip 0.5, crop 0.5, ...``)."""
    a = cfg.data.augment
    ops = [("crop", a.crop.p), ("shift", a.shift.p), ("rotation", a.rotation.p), ("color", a.color.p),
           ("grayscale", a.grayscale.p), ("erasing", a.erasing.p)]
    return ", ".join(f"{k} {p:g}" for k, p in [("flip", cfg.data.flip_probability()), *ops] if p > 0)
