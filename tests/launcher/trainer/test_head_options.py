"""Issue 12 items 2 and 3 through the config and the trainer: ``head.dtype`` and ``optim.name=adamw``
reach the head (its dtype, a lazy AdamW with the configured head LR and weight decay), end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from launcher.config import ConfigError, load_config
from launcher.distributed import DistContext
from launcher.trainer.components import build
from partialfc import PartialFC, PartialFCAdamW, PartialFCSGD
from tests.support.distributed import run_ranks

IMAGE = 32
BASE = ["model.backbone=tiny", f"model.image_size={IMAGE}", "model.embedding_size=16"]


@pytest.mark.parametrize("dtype, torch_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                                ("fp16", torch.float16)])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_build_gives_the_head_the_configured_optimizer_and_dtype(name: str, dtype: str,
                                                                  torch_dtype: torch.dtype) -> None:
    cfg = load_config(None, [*BASE, f"optim.name={name}", "optim.lr=0.02", "optim.head_lr=0.003",
                             "optim.weight_decay=0.07", f"head.dtype={dtype}"])
    c = build(cfg, DistContext.single_process(), num_classes=50)
    assert c.head.weight.dtype == torch_dtype
    assert isinstance(c.head_opt, PartialFCAdamW if name == "adamw" else PartialFCSGD)
    group = c.head_opt.param_groups[0]
    # main gave adamw's head an SGD with momentum 0.9 at lr 0.001 and wd 0.1, whatever the config said
    assert group["lr"] == pytest.approx(0.003) and group["weight_decay"] == pytest.approx(0.07)
    if name == "adamw":
        assert group["betas"] == (0.9, 0.999) and "momentum" not in group


def test_adamw_refuses_a_momentum_it_would_ignore() -> None:
    with pytest.raises(ConfigError, match=r"optim.momentum=0.5 has no effect with optim.name=adamw"):
        load_config(None, ["optim.name=adamw", "optim.momentum=0.5"])
    with pytest.raises(ConfigError, match=r"head\.dtype"):
        load_config(None, ["head.dtype=fp64"])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_pipeline.synth import generate

    prefix = tmp_path_factory.mktemp("synth") / "train"
    generate(prefix, 30, 4, image_size=IMAGE, val_identities=4, val_pairs=10, seed=4, workers=1)
    return prefix


def _train(rank: int, world_size: int, overrides: list[str]) -> dict:
    from launcher.distributed import init_distributed
    from launcher.trainer.loop import train

    return train(load_config(None, overrides), init_distributed("gloo"))


@pytest.mark.multiprocess
def test_bf16_head_with_lazy_adamw_and_grad_accum_trains_end_to_end(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    sets = {"data.prefix": str(dataset), "output": str(out), "data.workers": 0, "model.backbone": "tiny",
            "model.image_size": IMAGE, "model.embedding_size": 16, "train.batch_size": 4, "train.seed": 5,
            "train.steps": 4, "checkpoint.every_steps": 4, "head.sample_rate": 0.3, "head.dtype": "bf16",
            "optim.name": "adamw", "optim.lr": 0.001, "optim.head_lr": 0.05, "optim.weight_decay": 0.01,
            "optim.grad_accum": 2, "head.scale": 16.0, "log.every_steps": 1}
    summaries = run_ranks(_train, 2, [f"{k}={json.dumps(v)}" for k, v in sets.items()], timeout=300)
    assert summaries[0]["steps"] == 4 and summaries[0]["skipped_nonfinite"] == 0
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip() / "head"
    meta = json.loads((ckpt / "head_meta.json").read_text())
    assert meta["optimizer"] == "adamw" and meta["dtype"] == "torch.bfloat16"
    weight, steps = [], []
    for f in sorted(ckpt.glob("head_shard_*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            weight.append(fh.get_tensor("weight"))
            steps.append(fh.get_tensor("row_step"))
            assert fh.get_tensor("exp_avg_sq").dtype == torch.float32
    w, t = torch.cat(weight), torch.cat(steps)
    assert w.dtype == torch.bfloat16
    init = PartialFC(w.shape[0], 16, seed=5, dtype=torch.bfloat16).weight.detach()
    # Every row the lazy AdamW stepped moved (in bf16), and no other row did.
    moved = (w != init).any(dim=1)
    assert int((t > 0).sum()) > 0 and (t > 0).sum() < t.numel()
    assert torch.equal(moved, t > 0)
    assert int(t.max()) <= 4
