"""``eval`` settings no other test pinned to a behaviour: ``eval.batch_size`` is the number of images per
forward pass of a verification set, and ``eval.discrepancy_every_steps`` the interval at which the
training log gains DiscFace's discrepancy statistics (a small one-process run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launcher.config import load_config
from launcher.distributed import DistContext
from launcher.trainer.evaluation import evaluate_bins
from launcher.trainer.loop import train
from partialfc.backbones import get_backbone

IMAGE = 16


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from data_pipeline.synth import default_val_bin, generate

    prefix = tmp_path_factory.mktemp("settings_eval") / "train"
    # few identities: classes repeat within a batch, so the discrepancies are defined
    generate(prefix, 6, 4, image_size=IMAGE, val_identities=6, val_pairs=12, seed=2, workers=1)
    return prefix, default_val_bin(prefix)


class _Counting(torch.nn.Module):
    """A backbone that records the batch size of every forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = get_backbone("tiny", embedding_size=8, image_size=IMAGE)
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(int(x.shape[0]))
        out: torch.Tensor = self.net(x)
        return out


def test_eval_batch_size_is_the_images_per_forward(small: tuple[Path, Path]) -> None:
    """``eval.batch_size=5``: the set's images go through the model 5 at a time (each chunk, then its flip);
    the default (128) takes this small set in one chunk."""
    from data_pipeline.verification import load_bin

    _, val_bin = small
    images = len(load_bin(str(val_bin))[0])
    assert images > 10
    for sets, size in ((["eval.batch_size=5"], 5), ([], 128)):
        model = _Counting()
        cfg = load_config(None, [f"model.image_size={IMAGE}", *sets])
        evaluate_bins(model, [str(val_bin)], cfg, DistContext.single_process())
        chunks = [min(size, images - i) for i in range(0, images, size)]
        assert model.batches == [n for n in chunks for _ in (0, 1)], (size, model.batches)


def test_eval_log_line_says_n_a_for_a_tar_the_set_cannot_show(small: tuple[Path, Path], caplog) -> None:
    """12 pairs hold too few impostor pairs for FAR=1e-3: the log line says n/a, not Python's None."""
    _, val_bin = small
    cfg = load_config(None, [f"model.image_size={IMAGE}"])
    with caplog.at_level("INFO", logger="pfc"):
        result = evaluate_bins(_Counting(), [str(val_bin)], cfg, DistContext.single_process())
    assert next(iter(result.values()))["tar_at_far"]["1e-3"] is None
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval ")]
    assert line.endswith("TAR@FAR=1e-3 n/a") and "None" not in line, line


def _logged_keys(out: Path) -> dict[int, set[str]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: set(r) for r in rows if "loss" in r}


def test_discrepancy_statistics_appear_at_their_interval(small: tuple[Path, Path], tmp_path: Path) -> None:
    """``eval.discrepancy_every_steps=3`` (logging every step): the discrepancy statistics are first computed
    after step 3, so the log's rows 1-2 lack them and rows 3-4 hold them; the default (50) never computes
    them in a 4-step run."""
    prefix, _ = small
    sets = {"data.prefix": str(prefix), "data.workers": 0, "data.loader": "torch", "model.backbone": "tiny",
            "model.image_size": IMAGE, "model.embedding_size": 16, "train.batch_size": 8, "train.steps": 4,
            "optim.warmup_steps": 0, "log.every_steps": 1, "head.discface_lambda": 0.1,
            "checkpoint.every_steps": 1000}
    logged = {}
    for name, extra in (("every3", {"eval.discrepancy_every_steps": 3}), ("default", {})):
        out = tmp_path / name
        cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in {**sets, **extra, "output": str(out)}.items()])
        assert train(cfg, DistContext.single_process())["steps"] == 4
        logged[name] = {step: {k for k in keys if k.startswith("discrepancy_")}
                        for step, keys in _logged_keys(out).items()}
    assert sorted(logged["every3"]) == [1, 2, 3, 4]
    assert not logged["every3"][1] and not logged["every3"][2]
    assert "discrepancy_directional_deg" in logged["every3"][3] and logged["every3"][3] == logged["every3"][4]
    assert not any(logged["default"].values())
