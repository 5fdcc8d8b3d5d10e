"""The trainer's view of its data: an endless, resumable stream of (images, labels) batches per rank.

The data position is a pure function of the optimizer step (``step * grad_accum`` batches of this
rank consumed), because every rank reads an equal-length, reproducible part of each epoch
(``data_pipeline.dataset.shard_plan``). Resuming at step n therefore needs no loader state.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.insightface import InsightFaceReader, property_path, read_property
from data_pipeline.recordio import RecordIOError
from launcher.config import Config
from launcher.distributed import DistContext
from launcher.errors import DataError

log = logging.getLogger("pfc")


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
    def __init__(self, loader: Any, batch_size: int, micro_per_step: int, num_classes: int, kind: str) -> None:
        self.loader = loader
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

    def position(self, step: int) -> dict[str, int]:
        consumed = step * self.micro_per_step
        return {"epoch": consumed // self.batches_per_epoch,
                "batch_in_epoch": consumed % self.batches_per_epoch, "batch_size": self.batch_size}

    def seek(self, step: int) -> None:
        pos = self.position(step)
        self.epoch = pos["epoch"]
        self.loader.set_epoch(self.epoch, pos["batch_in_epoch"] * self.batch_size)
        self._it = iter(self.loader)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self.seek(0)
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self.loader.set_epoch(self.epoch, 0)
            self._it = iter(self.loader)
            return next(self._it)

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
        order = np.argsort(offsets, kind="stable")
        picks = {int(keys[order[0]]), int(keys[order[-1]])}
        rng = np.random.default_rng(seed)
        picks.update(int(k) for k in rng.choice(keys, size=min(samples, len(keys)), replace=False))
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


def load_data(cfg: Config, ctx: DistContext) -> TrainData:
    if not cfg.data.prefix:
        raise DataError("no training data: set data.prefix (or pass --data PREFIX); "
                        "`pfc data synth` makes a synthetic set")
    prefix = Path(cfg.data.prefix)
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
                                 flip=cfg.data.flip)
    else:
        from data_pipeline.dataset import build_dataloader

        loader = build_dataloader(reader, cfg.train.batch_size, ctx.rank, ctx.world_size, cfg.train.seed,
                                  cfg.data.workers, flip=cfg.data.flip, skip_corrupt=cfg.data.skip_corrupt,
                                  pin_memory=ctx.device.type == "cuda")
    log.info(f"data: {prefix} ({len(reader)} images, {num_classes} classes, {h}x{w}) via the {kind} loader")
    return TrainData(loader, cfg.train.batch_size, cfg.optim.grad_accum, num_classes, kind)
