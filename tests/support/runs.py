"""Shared pieces of the end-to-end trainer tests: a small synthetic dataset, the overrides of a tiny run,
one rank's training, `pfc` as a real process, and readers of a run's checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.pfc_forks import PfcForks

IMAGE = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    from data_pipeline.synth import default_val_bin, generate

    root = tmp_path_factory.mktemp("synth")
    prefix = root / "train"
    generate(prefix, 48, 8, image_size=IMAGE, val_identities=40, val_pairs=400, seed=3, workers=1)
    return prefix, default_val_bin(prefix)


@pytest.fixture(scope="module")
def pfc() -> Iterator[PfcForks]:
    """Single-process `pfc` commands as forks of one process that imported the launcher (pfc.run(args))."""
    with PfcForks() as forks:
        yield forks


def _overrides(prefix: Path, out: Path, **extra: object) -> list[str]:
    sets = {
        "data.prefix": str(prefix), "output": str(out), "data.workers": 0, "model.backbone": "tiny",
        "model.image_size": IMAGE, "model.embedding_size": 64, "train.batch_size": 16, "train.seed": 5,
        "head.sample_rate": 0.5, "head.margin": [1.0, 0.0, 0.3], "head.scale": 16.0,
        "head.discface_lambda": 0.1, "optim.lr": 0.05, "optim.warmup_steps": 2, "log.every_steps": 2,
        "eval.discrepancy_every_steps": 2,
    }
    sets.update(extra)
    return [f"{k}={json.dumps(v)}" for k, v in sets.items()]


def _train(rank: int, world_size: int, overrides: list[str]) -> dict:
    from launcher.config import load_config
    from launcher.distributed import init_distributed
    from launcher.trainer.loop import train

    cfg = load_config(None, overrides)
    ctx = init_distributed("gloo")
    return train(cfg, ctx)


def _head_matrix(ckpt: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The full class-weight matrix and its momentum, from the class-range keyed shard files."""
    shards = sorted(ckpt.glob("head/head_shard_*.safetensors"))
    parts = [load_file(str(s)) for s in shards]
    return torch.cat([p["weight"] for p in parts]), torch.cat([p["momentum"] for p in parts])


def _latest(out: Path) -> Path:
    return out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()


def _pfc(args: list[str], fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.pop("PFC_FAULT", None)
    if fault:
        env["PFC_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def refused_in_one_line(r: subprocess.CompletedProcess[str]) -> str:
    """The one stderr line of a `pfc` command that refused a user's setting: exit 2, no traceback, nothing
    else on stderr."""
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def _train_args(prefix: Path, out: Path, **extra: object) -> list[str]:
    args = ["train", "demo_cpu"]
    for o in _overrides(prefix, out, **extra):
        args += ["--set", o]
    return args


def _assert_same_run(a: Path, b: Path) -> None:
    la, lb = _latest(a), _latest(b)
    assert la.name == lb.name
    wa, wb = load_file(str(la / "backbone.safetensors")), load_file(str(lb / "backbone.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"backbone tensor {k} differs"
    ha, hb = _head_matrix(la), _head_matrix(lb)
    assert torch.equal(ha[0], hb[0]) and torch.equal(ha[1], hb[1])


def _assert_same_tensors(a: Path, b: Path) -> None:
    """Every tensor of every safetensors file of checkpoint ``a`` (backbone, head shards with their
    optimizer state, DiscFace's b) equals ``b``'s, bit for bit."""
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert any(f.parts[0] == "head" for f in files) and any(f.name == "backbone.safetensors" for f in files), files
    for f in files:
        x, y = load_file(str(a / f)), load_file(str(b / f))
        assert set(x) == set(y), f
        for k in x:
            assert torch.equal(x[k], y[k]), f"{f}:{k} differs"


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc). torchrun starts each rank in a session of its own, so
    killing the launcher's process group does not reach the ranks."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    below: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {c for c, pp in parent.items() if pp in frontier} - below
        below |= frontier
    return below
