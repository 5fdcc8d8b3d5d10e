"""Host memory of a GPU head shard's checkpoint (partialfc/safetensors_stream.py): one bounded piece, where
safetensors' ``save_file`` needs the shard copied to the host whole. Marked ``gpu``: on the CPU both write
the tensor where it lies, so the test skips there even under PFC_GPU_TESTS_ON_CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]


_PEAK = textwrap.dedent("""
    import sys, torch
    from partialfc.safetensors_stream import save_file_streaming
    from safetensors.torch import save_file

    def status_kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    dev, how, out = sys.argv[1], sys.argv[2], sys.argv[3]
    w = torch.ones(256 << 20 >> 2, device=dev)  # 256 MiB on the device
    if dev == "cuda":
        torch.cuda.synchronize()
    # The peak resident size since now: getrusage's ru_maxrss is the process's peak since it started, and
    # CUDA's start-up (its libraries and context) had already taken it above what the writers add
    # (measured on an H200: 0 MiB added for both). Writing 5 to clear_refs resets that peak (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    if how == "stream":
        save_file_streaming({"weight": w}, out, chunk_bytes=16 << 20)
    else:
        save_file({"weight": w.cpu()}, out)
    print((status_kib("VmHWM") - before) // 1024)  # MiB
""")


def _peak_mib(dev: str, how: str, out: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", _PEAK, dev, how, str(out)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stdout.strip().splitlines()[-1])


def test_a_gpu_shard_is_written_through_a_bounded_host_buffer(tmp_path: Path) -> None:
    """The point of the writer: a 256 MiB CUDA tensor costs the host one 16 MiB piece, where copying it to
    the host for ``save_file`` costs its whole size. (Peak resident memory, in a fresh process each.)"""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: on the CPU both writers write the tensor where it lies")
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs a writable /proc/self/clear_refs (Linux) to reset the peak resident size")
    stream = _peak_mib("cuda", "stream", tmp_path / "a.safetensors")
    whole = _peak_mib("cuda", "whole", tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert stream < 96 and whole >= 200, (stream, whole)


def test_strided_device_tensors_pass_through_the_staging_buffer(dev: torch.device, tmp_path: Path) -> None:
    """A transposed and an expanded tensor on the device (pieces of whole rows made contiguous there, then
    copied through the pinned buffer) beside a contiguous one: ``save_file``'s bytes of their host copies."""
    from safetensors.torch import save_file

    from partialfc.safetensors_stream import save_file_streaming

    g = torch.Generator().manual_seed(4)
    tensors = {"t": torch.randn(9, 5, generator=g).to(dev).t(), "w": torch.randn(7, 3, generator=g).to(dev),
               "zero": torch.zeros((), device=dev).expand(13, 4), "host_zero": torch.zeros(()).expand(6, 2)}
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(tmp_path / "ref.safetensors"))
    for chunk in (7, 24, 1 << 20):
        save_file_streaming(tensors, tmp_path / "mine.safetensors", chunk_bytes=chunk)
        assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes(), chunk
