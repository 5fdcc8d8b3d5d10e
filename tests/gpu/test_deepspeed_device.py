"""DeepSpeed on the rank's own GPU, whatever LOCAL_RANK says: a SLURM task bound to one GPU trains on cuda:0
while LOCAL_RANK is its SLURM_LOCALID, and ranks sharing a GPU have local ranks past the GPUs there are.
Left to itself DeepSpeed calls ``set_device(LOCAL_RANK)`` and moves the backbone there (an invalid device
ordinal on a one-GPU machine); the trainer names the device (``args.device_rank``). And a recipe's
``train.channels_last=true`` (DeepSpeed's start fails on channels-last weights: they stay contiguous under it).
Under the CPU stand-in the engine runs on the CPU and the test only keeps its code alive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launcher.config import load_config
from launcher.distributed import DistContext

pytestmark = pytest.mark.gpu


def test_deepspeed_uses_the_ranks_device_not_local_rank(dev: torch.device, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("deepspeed")
    from launcher.trainer.components import build

    backend = "nccl" if dev.type == "cuda" else "gloo"
    count = torch.cuda.device_count() if dev.type == "cuda" else 1
    # a local rank naming no GPU of this machine, as a SLURM_LOCALID of a task bound to one GPU would
    monkeypatch.setenv("LOCAL_RANK", str(count))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    kw = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend, store=store, rank=0, world_size=1, **kw)  # type: ignore[arg-type]
    try:
        sets = {"model.backbone": "tiny", "model.image_size": 16, "model.embedding_size": 8, "train.batch_size": 4,
                "dist.engine": "deepspeed", "dist.zero_stage": 1, "train.channels_last": True}
        cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])
        ctx = DistContext(0, 1, 0, 1, 0, dev, backend, store=store)
        torch.manual_seed(0)
        engine = build(cfg, ctx, 10).engine
        assert {p.device for p in engine.module.parameters()} == {dev}
        out = engine.forward(torch.randn(4, 3, 16, 16, device=dev))
        assert out.device == dev and out.shape == (4, 8)
    finally:
        dist.destroy_process_group()
