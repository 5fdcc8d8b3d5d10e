"""Verification on insightface ``.bin`` pair sets, during training (sharded across ranks) and in ``pfc eval``.

Each rank decodes and embeds a contiguous slice of a set's images (each image and its flip, summed and
L2-normalised); the slices are all-gathered, and every rank computes the same metrics from the full set.
Every rank first takes rank 0's buffers (BatchNorm running statistics differ per rank: each saw its own
batches), so the model measured is the one a checkpoint holds (rank 0 saves it).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from data_pipeline.pack import RESAMPLE, rgb8
from data_pipeline.verification import load_bin
from launcher.config import Config, val_set_name
from launcher.distributed import DistContext
from partialfc.metrics import flip_embed, verification_metrics

log = logging.getLogger("pfc")


def decode_images(blobs: list[bytes], image_size: int) -> torch.Tensor:
    """Encoded images -> (n, 3, S, S) float32 in [-1, 1] (RGB), read as pack and `pfc embed` read a file
    (:func:`~data_pipeline.pack.rgb8`: upright, 16-bit grey scaled), so that a .bin that `pfc data pairs`
    made of a folder is seen as training saw the same folder."""
    out = np.empty((len(blobs), image_size, image_size, 3), dtype=np.uint8)
    for i, b in enumerate(blobs):
        with Image.open(io.BytesIO(b)) as encoded:
            img = rgb8(encoded, f"image {i}")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), RESAMPLE)  # as pack resized the training images
        out[i] = np.asarray(img)
    t = torch.from_numpy(out).permute(0, 3, 1, 2).float()
    return t.div_(127.5).sub_(1.0)


def _gather_rows(local: torch.Tensor, total: int, ctx: DistContext) -> torch.Tensor:
    """Concatenate each rank's (n_k, d) slice in rank order; gloo needs equal sizes, so pad then trim."""
    if not ctx.distributed:
        return local
    sizes = [len(c) for c in torch.arange(total).chunk(ctx.world_size)]
    sizes += [0] * (ctx.world_size - len(sizes))
    width = max(sizes)
    padded = torch.zeros(width, local.shape[1], dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    bufs = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(bufs, padded)
    return torch.cat([b[:n] for b, n in zip(bufs, sizes, strict=True)])


@torch.no_grad()
def embed_bin(model: torch.nn.Module, blobs: list[bytes], image_size: int, batch_size: int,
              ctx: DistContext) -> torch.Tensor:
    """(n, d) normalised embeddings of every image of a set, identical on every rank."""
    n = len(blobs)
    chunks = torch.arange(n).chunk(ctx.world_size)
    mine = chunks[ctx.rank] if ctx.rank < len(chunks) else torch.arange(0)
    parts = []
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size].tolist()
        images = decode_images([blobs[i] for i in idx], image_size).to(ctx.device)
        parts.append(flip_embed(model, images, batch_size=batch_size).float())
    dim = _embedding_dim(model, image_size, ctx.device) if not parts else parts[0].shape[1]
    local = torch.cat(parts) if parts else torch.zeros(0, dim, device=ctx.device)
    return _gather_rows(local, n, ctx)


def _embedding_dim(model: torch.nn.Module, image_size: int, device: torch.device) -> int:
    probe = torch.zeros(2, 3, image_size, image_size, device=device)
    return int(model(probe).shape[1])


def take_rank0_state(model: torch.nn.Module, ctx: DistContext) -> None:
    """Collective: copy rank 0's buffers into every rank's ``model``, in place.

    Under DDP and ZeRO-1/2 the parameters are already equal; the BatchNorm running statistics are not
    (DeepSpeed never syncs them, DDP broadcasts them at the *next* forward). They do not affect training
    (batch statistics are used in train mode), so overwriting them changes nothing but what is measured."""
    if not ctx.distributed:
        return
    with torch.no_grad():
        for t in model.buffers():
            dist.broadcast(t, src=0)


def evaluate_bins(model: torch.nn.Module, bins: list[str], cfg: Config, ctx: DistContext,
                  roc_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Metrics per set name (``val_set_name``: the ``.bin`` file name; see
    ``partialfc.metrics.verification_metrics``); collective.

    Measures rank 0's weights and buffers, the ones a checkpoint saves (:func:`take_rank0_state`)."""
    take_rank0_state(model, ctx)
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, Any]] = {}
    for path in bins:
        blobs, issame = load_bin(path)
        emb = embed_bin(model, blobs, cfg.model.image_size, cfg.eval.batch_size, ctx).cpu().numpy()
        name = val_set_name(path)  # distinct per set: the config refuses two of one stem
        roc_png = (roc_dir / f"roc_{Path(name).stem}.png") if (roc_dir is not None and ctx.is_main) else None
        results[name] = verification_metrics(emb[0::2], emb[1::2], np.asarray(issame, dtype=bool),
                                             roc_png=roc_png)
        r = results[name]
        tar = r["tar_at_far"]["1e-3"]  # None when the set has too few impostor pairs for that FAR
        log.info(f"eval {name}: accuracy {r['accuracy']:.4f} ± {r['accuracy_std']:.4f}  "
                 f"TAR@FAR=1e-3 {'n/a' if tar is None else f'{tar:.4f}'}")
    model.train(was_training)
    return results


@torch.no_grad()
def heldout_discrepancy_of(model: torch.nn.Module, prefix: str | Path, image_size: int, batch_size: int,
                           device: torch.device, max_images: int | None = None) -> dict[str, float]:
    """DiscFace's directional and radial discrepancy on a labelled held-out set (insightface layout).

    Identities there are unseen, so each one's centre is its normalised mean feature
    (``discface.heldout_discrepancy``); compare the numbers between models on the same set.
    """
    from data_pipeline.insightface import InsightFaceReader
    from discface import heldout_discrepancy

    was_training = model.training
    model.eval()
    with InsightFaceReader(prefix) as reader:
        keys = reader.image_keys[:max_images] if max_images else reader.image_keys
        embs, labels = [], []
        for start in range(0, len(keys), batch_size):
            items = [reader.read_image(k) for k in keys[start:start + batch_size]]
            images = decode_images([b for _, b in items], image_size).to(device)
            embs.append(flip_embed(model, images, batch_size=batch_size).float().cpu())
            labels += [lab for lab, _ in items]
    model.train(was_training)
    return heldout_discrepancy(torch.cat(embs), torch.tensor(labels, dtype=torch.int64))
