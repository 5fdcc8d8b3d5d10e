"""`pfc train --data IMAGE_FOLDER` walks the image folder once: the command resolves (and packs) it before the
trainer starts, then hands the packed PREFIX to the trainer in this process or to torchrun's ranks, which open
it directly. A rank started without `pfc train`'s torchrun (srun, a PyTorchJob) still resolves it itself.

The walks are counted by the kernel: every walk (the fingerprint that checks the cache is current) lists every
identity folder, and inotify reports each opening of a watched folder, from any process. One walk's openings
are measured first (``list_folder``, the listing the fingerprint makes; pathlib's rglob opens a folder more
than once on some Python versions).
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from data_pipeline.pack import list_folder
from launcher.trainer.data_paths import DATA_CACHE, resolve_prefix
from tests.support.images import identity_folder

IN_OPEN, IN_CLOSE_NOWRITE = 0x20, 0x10
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then len bytes of name)


class FolderOpens:
    """How often each watched folder itself was opened (listed), as inotify reports it. Closes are watched
    too only so that two openings in a row stay two events (inotify merges identical consecutive ones)."""

    def __init__(self, folders: list[Path]) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.folders: dict[int, Path] = {}
        for f in folders:
            wd = libc.inotify_add_watch(self.fd, os.fsencode(f), IN_OPEN | IN_CLOSE_NOWRITE)
            assert wd >= 0, os.strerror(ctypes.get_errno())
            self.folders[wd] = f
        self.counts: Counter[Path] = Counter({f: 0 for f in folders})

    def openings(self) -> int:
        """Openings of the least opened folder so far: a walk opens every one of them alike; the look for
        an image folder stops in the first that holds an image."""
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            i = 0
            while i < len(buf):
                wd, mask, _, length = _EVENT.unpack_from(buf, i)
                if mask & IN_OPEN and length == 0:  # the folder itself, not a file in it
                    self.counts[self.folders[wd]] += 1
                i += _EVENT.size + length
        return min(self.counts.values())

    def close(self) -> None:
        os.close(self.fd)


def _folder(root: Path, identities: int = 4, per_identity: int = 4, size: int = 40) -> Path:
    return identity_folder(root, identities, per_identity, size)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "TORCHELASTIC", "GROUP_"))}
    return {**env, **extra}


def _train_cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "launcher.cli", "train", "demo_cpu", "--data", str(src), "--output", str(out),
            "--set", "train.steps=1", "--set", "optim.warmup_steps=0", "--set", "train.batch_size=8",
            "--set", "data.workers=0", *extra]


def _openings(src: Path, run: Callable[[], Any]) -> int:
    opens = FolderOpens(sorted(p for p in src.iterdir() if p.is_dir()))
    try:
        run()
        return opens.openings()
    finally:
        opens.close()


def _train_counting_walks(src: Path, out: Path, *extra: str) -> tuple[str, float]:
    """`pfc train` on ``src``: its output, and how many times it walked ``src``."""
    per_walk = _openings(src, lambda: list_folder(src))
    assert per_walk >= 1
    runs: list[subprocess.CompletedProcess[str]] = []
    opened = _openings(src, lambda: runs.append(subprocess.run(_train_cmd(src, out, *extra), capture_output=True,
                                                               text=True, timeout=300, env=_clean_env())))
    log = runs[0].stdout + runs[0].stderr
    assert runs[0].returncode == 0, log[-3000:]
    return log, opened / per_walk


def test_pfc_train_walks_a_packed_image_folder_once(tmp_path):
    """The command checked the cache (one walk); the trainer used to check it again (a second walk)."""
    src, out = _folder(tmp_path / "faces"), tmp_path / "run"
    resolve_prefix(str(src), out, 32)  # packed by an earlier run into this output
    log, walks = _train_counting_walks(src, out)
    assert walks == 1, log
    assert log.count(f"data: {src} already packed in {out / DATA_CACHE}") == 1, log
    assert "run finished: 1 steps" in log, log


@pytest.mark.multiprocess
def test_torchrun_ranks_open_the_packed_prefix_without_walking_the_folder(tmp_path):
    """Under --nproc-per-node 2 the folder was walked five times: once by the command, twice on each rank."""
    src, out = _folder(tmp_path / "faces"), tmp_path / "run"
    resolve_prefix(str(src), out, 32)
    log, walks = _train_counting_walks(src, out, "--nproc-per-node", "2")
    assert walks == 1, log
    assert log.count("already packed") == 1, log
    assert f"data: {out / DATA_CACHE / 'train'} (16 images, 4 classes, 32x32)" in log, log


@pytest.mark.multiprocess
def test_ranks_started_without_pfc_trains_torchrun_resolve_and_pack_the_folder_once(tmp_path):
    """srun or a PyTorchJob starts every rank as `pfc train` itself: each resolves the folder, one packs
    it and the other waits for the pack, and both train on it."""
    src, out = _folder(tmp_path / "faces"), tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(_train_cmd(src, out), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=_clean_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                                             MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    packer = json.loads((out / DATA_CACHE / "pack.json").read_text())["packed_by_pid"]
    assert packer in {p.pid for p in procs}
    assert "run finished: 1 steps" in logs[0], logs[0]
    assert not list(out.glob(f"{DATA_CACHE}.lock")) and not list(out.glob(f".{DATA_CACHE}.partial-*"))


def test_the_resolved_prefix_reaches_the_trainer_whatever_its_characters(tmp_path):
    """The PREFIX the command resolved goes to the trainer as a --set item, which is read as YAML: written
    with json.dumps, a character outside the BMP (an emoji in the run folder's name, given with --set) came
    back as two lone surrogates, and the trainer stopped on a UnicodeEncodeError traceback for the cache the
    command had just packed (it trained when the trainer resolved the image folder itself)."""
    import yaml

    src, out = _folder(tmp_path / "faces"), tmp_path / "run \U0001f600 ünï"
    cmd = [*_train_cmd(src, tmp_path / "unused"), "--set", f'output="{out}"']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_clean_env())
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "run finished: 1 steps" in r.stdout + r.stderr
    ran = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert ran["data"]["prefix"] == str(out / DATA_CACHE / "train"), ran["data"]
