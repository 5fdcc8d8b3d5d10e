"""Checkpoints across devices: the CUDA generator's state travels with a rank's RNG states (restored on a GPU,
left unused on a CPU-only machine), and a checkpoint written on a GPU is still refused by name on a CPU-only
machine when one of its files carries pickled code."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from launcher.trainer.checkpoint_files import CheckpointContents
from launcher.trainer.checkpointer import RandomState
from launcher.trainer.rank_rng import rank_stream_seed
from tests.support.runs import _latest, _pfc, _train_args

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _as_written_on_a_gpu(f: Path) -> None:
    """Rewrite a ``torch.save`` file so that its tensors' storage location is ``cuda:0``, byte for byte what a
    GPU process writes (the pickle names each storage's device); loading it without ``map_location`` on a
    machine without CUDA fails."""
    with zipfile.ZipFile(f) as z:
        entries = [(n, z.read(n)) for n in z.namelist()]
    cpu, gpu = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"  # pickle protocol 2: BINUNICODE, length
    assert any(n.endswith("/data.pkl") and cpu in b for n, b in entries)
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries:
            z.writestr(name, data.replace(cpu, gpu) if name.endswith("/data.pkl") else data)


class _Payload:
    """Unpickling this runs ``Path(marker).touch()``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


@pytest.mark.multiprocess
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only side of a GPU-written checkpoint")
def test_refused_rank_file_is_named_when_the_trainer_state_was_written_on_a_gpu(dataset, tmp_path):
    prefix, _ = dataset
    out = tmp_path / "run"
    r = _pfc(_train_args(prefix, out, **{"train.steps": 2, "checkpoint.every_steps": 2}))
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = _latest(out)
    _as_written_on_a_gpu(ckpt / "trainer_state.pt")
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(ckpt / "trainer_state.pt", weights_only=True)  # the file really is a GPU-written one
    rank_file = ckpt / "rank" / "rank_00000.pt"
    marker = tmp_path / "pwned"
    rank_file.write_bytes(pickle.dumps({"state": _Payload(marker)}))
    r = _pfc(_train_args(prefix, out, **{"train.steps": 4, "checkpoint.every_steps": 2}))
    log = r.stdout + r.stderr
    assert r.returncode != 0 and not marker.exists()
    assert f"refusing to resume: {rank_file} holds more than tensors" in log, log[-3000:]
    assert "Attempting to deserialize object on a CUDA device" not in log, log[-3000:]


def test_a_cpu_rng_state_has_no_cuda_entry_and_one_with_it_loads_on_the_cpu():
    saved = CheckpointContents(step=1)
    RandomState(torch.device("cpu")).save(saved)
    assert "cuda" not in saved.rank_state["rng"]  # type: ignore[index]
    expected = torch.rand(4)
    # what a GPU rank saves: its CUDA generator's state (a CPU uint8 tensor) beside the others
    assert saved.rank_state is not None
    saved.rank_state["rng"]["cuda"] = torch.zeros(16, dtype=torch.uint8)
    RandomState(torch.device("cpu")).load(saved)
    assert torch.equal(torch.rand(4), expected), "the CPU generator was not restored"


@pytest.mark.gpu  # scripts/gpu_check.py runs it on the GPU machine
@needs_cuda
def test_cuda_rng_state_is_saved_and_restored_on_the_gpu():
    dev = torch.device("cuda", torch.cuda.current_device())
    saved = CheckpointContents(step=1)
    RandomState(dev).save(saved)
    assert saved.rank_state is not None and "cuda" in saved.rank_state["rng"]
    expected = torch.rand(4, device=dev)
    RandomState(dev).load(saved)
    assert torch.equal(torch.rand(4, device=dev), expected), "the CUDA generator was not restored"
    # a CPU-written state (no CUDA entry) loads on a GPU: the CUDA generator takes the rank's stream for
    # the step reached (not the seeded state of step 0, whose draws it would replay)
    del saved.rank_state["rng"]["cuda"]
    RandomState(dev, seed=7, rank=1).load(saved)
    loaded = torch.cuda.get_rng_state(dev)
    torch.cuda.manual_seed(rank_stream_seed(7, 1, saved.step))
    assert torch.equal(loaded, torch.cuda.get_rng_state(dev))
