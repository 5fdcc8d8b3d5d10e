"""``pfc bench data --scale N``: the data room's figures on a synthetic WebFace42M-sized file.

Every step runs in a fresh Python process (its peak RSS is its own); ``open`` runs ``world_size`` of
them at once, one per rank, as a multi-rank job opens the same dataset (each rank its own reader,
the index cache's pages shared between them).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from data_pipeline.loader_bench import load_average

__all__ = ["bench_scale"]

_SCALE_CHILD = r"""
import json, os, resource, sys, time
sys.path[:0] = {path!r}
step = {step!r}
prefix = {prefix!r}

def status():
    out = {{}}
    with open('/proc/self/status') as f:
        for line in f:
            k, _, v = line.partition(':')
            if k in ('VmRSS', 'RssAnon', 'RssFile'):
                out[k] = int(v.split()[0]) / 1024.0
    return out

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

res = {{}}
if step == 'inspect':
    from data_pipeline.checks import inspect_dataset
    t = time.perf_counter()
    rep = inspect_dataset(prefix)
    res.update(seconds=time.perf_counter() - t, ok=rep['ok'], records=rep['records'], images=rep['images'],
               identities=rep['identities'], corrupt=len(rep['corrupt']), peak_rss_mib=peak_mib())
elif step == 'open':
    import numpy as np
    import torch  # imported before the baseline: the figure is the dataset's, not torch's
    from data_pipeline.dataset import FaceDataset, ShardedSampler
    from data_pipeline.insightface import InsightFaceReader
    rank, world = {rank!r}, {world!r}
    before = status()
    t = time.perf_counter()
    reader = InsightFaceReader(prefix)
    ds = FaceDataset(reader)
    sampler = ShardedSampler(len(ds), rank, world, seed=0)
    sampler.set_epoch(0)
    idx = sampler.indices()
    opened = time.perf_counter() - t
    after = status()
    res.update(open_seconds=opened, images=len(ds), rank_samples=len(idx),
               rss_added_mib=after['VmRSS'] - before['VmRSS'], anon_added_mib=after['RssAnon'] - before['RssAnon'],
               file_added_mib=after['RssFile'] - before['RssFile'])
    # a forked DataLoader worker: reads records of this rank's epoch through the dataset's keys
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        def private():
            with open('/proc/self/smaps_rollup') as f:
                return sum(int(l.split()[1]) for l in f if l.startswith('Private_Dirty')) / 1024.0
        base = private()
        keys = ds.keys
        touched = int(np.asarray(keys[idx]).sum() & 1)   # every key of the epoch, as the sampler hands them out
        pick = idx[:: max(1, len(idx) // {reads!r})]
        t = time.perf_counter()
        for i in pick.tolist():
            reader.read_image(int(keys[i]))
        os.write(wfd, json.dumps(dict(worker_private_dirty_mib=private() - base, worker_reads=len(pick),
                                      worker_read_seconds=time.perf_counter() - t, touched=touched)).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    res.update(json.loads(os.read(rfd, 65536).decode()))
elif step == 'dali':
    from data_pipeline.dali_iterator import DaliLoader
    from data_pipeline.insightface import InsightFaceReader
    rank, world = {rank!r}, {world!r}
    loader = DaliLoader(InsightFaceReader(prefix), 128, rank, world, seed=0, threads=1)
    segs = loader._segments()
    t = time.perf_counter()
    first = loader._write_index(0, *segs[0])
    res['segment_index_seconds'] = time.perf_counter() - t
    t = time.perf_counter()
    pipe = loader._build(first, segs[0][0])
    res['segment_build_seconds'] = time.perf_counter() - t
    del pipe
    # the epoch boundary: the next epoch's first segment was prepared in the background while the
    # epoch ran (waited for here); what remains at the boundary is taking it and building its pipeline
    loader.prepare(1, *segs[0])
    loader._next[1].result()
    loader.set_epoch(1)
    t = time.perf_counter()
    index = loader.epoch_index()
    pipe = loader._build(index, 0)
    res['epoch_boundary_seconds'] = time.perf_counter() - t
    res.update(segments=len(segs), segment_samples=loader.segment, rank_samples=loader.per_rank,
               index_entries=len(index.order[rank]), peak_rss_mib=peak_mib())
    del pipe
    loader.close()
print(json.dumps(res))
"""


def _scale_child(step: str, prefix: str, rank: int = 0, world: int = 1, reads: int = 20000,
                 timeout: float = 1800) -> dict[str, Any]:
    import json
    import subprocess
    import sys

    code = _SCALE_CHILD.format(path=[p for p in sys.path if p], step=step, prefix=prefix, rank=rank, world=world,
                               reads=reads)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"scale bench step {step!r} failed:\n{proc.stderr[-2000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return dict(json.loads(lines[-1]))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def bench_scale(images: int, identities: int | None = None, workdir: str | os.PathLike[str] | None = None,
                world_size: int = 2, keep: bool = False, dali: bool | None = None) -> dict[str, Any]:
    """The issue-17 figures on a synthetic insightface-layout file of ``images`` images (tiny
    payloads, :func:`data_pipeline.scale.write_scale_dataset`), every step in a fresh process:

    * ``build``: writing the file; ``inspect_cold`` / ``inspect_cached``: ``pfc data inspect``'s check
      without and with the index cache (seconds, peak RSS, exact counts);
    * ``open``: per rank (``world_size`` processes at once), what opening the dataset for training adds
      to RSS (anonymous and file-backed pages), and what a forked DataLoader worker dirties while it
      reads records of the rank's epoch through the dataset's keys;
    * ``dali`` (when DALI imports): per-segment index and pipeline-build seconds, and the epoch
      boundary with the next epoch's index prepared in the background.

    The file goes to ``workdir`` (default a temporary folder) and is deleted unless ``keep``.
    """
    import shutil
    import tempfile
    from concurrent.futures import ThreadPoolExecutor as Pool

    from data_pipeline.scale import identity_sizes, write_scale_dataset

    identities = identities if identities is not None else max(1, images // 21)  # WebFace42M: ~21 per identity
    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix="pfc-scale-")) if workdir is None else Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    prefix = str(root / "train")
    out: dict[str, Any] = {"images": images, "identities": identities, "world_size": world_size,
                           "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "load_average_start": load_average()}
    try:
        t = time.perf_counter()
        info = write_scale_dataset(prefix, identity_sizes(images, identities))
        out["build"] = {"seconds": time.perf_counter() - t, "rec_bytes": info["rec_bytes"],
                        "idx_bytes": os.path.getsize(info["idx"])}
        out["inspect_cold"] = _scale_child("inspect", prefix)
        out["inspect_cached"] = _scale_child("inspect", prefix)
        with Pool(world_size) as pool:
            out["open"] = list(pool.map(lambda r: _scale_child("open", prefix, r, world_size), range(world_size)))
        if dali is None:
            from data_pipeline.dali_iterator import dali_available

            dali = dali_available()
        if dali:
            out["dali"] = _scale_child("dali", prefix, 0, world_size)
        out["load_average_end"] = load_average()
    finally:
        if not keep:
            if own:
                shutil.rmtree(root, ignore_errors=True)
            else:
                from data_pipeline.property_file import dataset_files

                for name in dataset_files(prefix):
                    name.unlink(missing_ok=True)
    return out
