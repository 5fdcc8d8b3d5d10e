"""The streaming safetensors writer and row reader of the head's checkpoint (partialfc/safetensors_stream.py):
the bytes of safetensors' own ``save_file``, read back by safetensors,; rows read a bounded piece at a time
(the host memory of a GPU shard's save: tests/gpu/test_head_file_memory.py)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from partialfc import PartialFC
from partialfc.resharding import load_head, shard_filename
from partialfc.safetensors_stream import copy_rows, save_file_streaming

REPO = Path(__file__).resolve().parents[2]


def _tensors(device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {
        "weight": torch.randn(37, 5, generator=g),
        "momentum": torch.randn(37, 5, generator=g),
        "row_step": torch.randint(0, 1 << 40, (37,), generator=g),
        "exp_avg": torch.randn(37, 5, generator=g, dtype=torch.float64),
        "w_bf16": torch.randn(11, 3, generator=g).bfloat16(),
        "w_fp16": torch.randn(4, 7, generator=g).half(),
        "ids": torch.randint(-5, 5, (9,), generator=g, dtype=torch.int32),
        "bytes": torch.randint(0, 255, (13,), generator=g, dtype=torch.uint8),
        "empty": torch.zeros(0, 5),
        "scalar": torch.tensor(3.5),
    }
    return {k: v.to(device) for k, v in out.items()}


def _parts(path: Path) -> tuple[int, dict[str, object], bytes]:
    """Header length, header, data: the same for two files means the same bytes up to the order of the
    metadata's keys, which ``save_file`` keeps in a hash map (its order changes from process to process)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n]), raw[8 + n:]


@pytest.mark.parametrize("chunk_bytes", [7, 64, 1 << 20])
@pytest.mark.parametrize("metadata", [None, {"format": "x", "start": "10", "num_classes": "99"}, {"z": "1", "a": "2"}])
def test_file_is_safetensors_save_files_bytes(tmp_path: Path, chunk_bytes: int,
                                                        metadata: dict[str, str] | None) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=metadata)
    save_file_streaming(tensors, tmp_path / "mine.safetensors", metadata=metadata, chunk_bytes=chunk_bytes)
    assert _parts(tmp_path / "mine.safetensors") == _parts(tmp_path / "ref.safetensors")
    back = load_file(str(tmp_path / "mine.safetensors"))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(tmp_path / "mine.safetensors"), framework="pt") as f:
        assert f.metadata() == metadata


@pytest.mark.parametrize("chunk_bytes", [7, 24, 64, 1 << 20])
def test_strided_tensors_are_written_as_their_contiguous_copies(tmp_path: Path, chunk_bytes: int) -> None:
    """A transposed, a stepped and an expanded tensor (a save without an optimizer expands one zero to the
    shard's shape) are written a piece of whole rows at a time, with ``save_file``'s bytes of their copies;
    pieces of 7 bytes are smaller than one row (one row a piece), 24 and 64 hold several."""
    g = torch.Generator().manual_seed(1)
    tensors = {"t": torch.randn(5, 9, generator=g).t(), "stepped": torch.randn(20, 3, generator=g)[::3],
               "zero": torch.zeros((), dtype=torch.float64).expand(13, 4),
               "wide": torch.arange(40, dtype=torch.int32).reshape(2, 20)[:, ::2],
               "ok": torch.randn(6, generator=g)}
    assert not any(v.is_contiguous() for k, v in tensors.items() if k != "ok")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "ref.safetensors"))
    save_file_streaming(tensors, tmp_path / "mine.safetensors", chunk_bytes=chunk_bytes)
    assert _parts(tmp_path / "mine.safetensors") == _parts(tmp_path / "ref.safetensors")


_NO_OPTIMIZER = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    from data_pipeline.atomic import atomic_write
    from partialfc import PartialFC
    from partialfc.resharding import save_head
    head = PartialFC(1 << 17, 512)  # a 256 MiB shard (float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    save_head(head, None, Path(sys.argv[1]), write=atomic_write)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)  # MiB
""")


def test_a_save_without_an_optimizer_writes_zero_momentum_a_piece_at_a_time(tmp_path: Path) -> None:
    """The zero momentum of a save without an optimizer is written from one expanded zero: the process's
    peak memory grows by one 64 MiB piece at most, not by the shard's 256 MiB (as a materialised zero
    did), and the file loads as the weights with zero momentum. (Peak resident memory, in a fresh process.)"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", _NO_OPTIMIZER, str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    grew_mib = int(res.stdout.strip().splitlines()[-1])
    assert grew_mib < 128, grew_mib
    saved = load_file(str(tmp_path / shard_filename(0, 1 << 17)))
    assert saved["momentum"].shape == (1 << 17, 512) and not saved["momentum"].any()
    assert torch.equal(saved["weight"], PartialFC(1 << 17, 512).weight)  # the seeded initial weights
    head = PartialFC(1 << 17, 512, seed=5)
    opt = head.make_optimizer(lr=0.1)
    opt.momentum_buffer.fill_(1.0)
    load_head(head, opt, tmp_path)
    assert torch.equal(head.weight, saved["weight"]) and not opt.momentum_buffer.any()


def test_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="complex64"):
        save_file_streaming({"w": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "b.safetensors")


class _CountingSlice:
    """A real ``safe_open`` slice that records how many rows each read asks for."""

    def __init__(self, sl: object) -> None:
        self.sl = sl
        self.reads: list[int] = []

    def __getitem__(self, key: slice) -> torch.Tensor:
        self.reads.append(key.stop - key.start)
        return self.sl[key]  # type: ignore[index]


@pytest.mark.parametrize("lo,hi", [(0, 37), (5, 30), (36, 37), (10, 10)])
def test_copy_rows_reads_bounded_pieces(tmp_path: Path, lo: int, hi: int) -> None:
    w = torch.randn(37, 5)
    save_file({"weight": w}, str(tmp_path / "s.safetensors"))
    dst = torch.full((hi - lo, 5), float("nan"))
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:
        sl = _CountingSlice(f.get_slice("weight"))
        copy_rows(sl, lo, hi, dst, chunk_bytes=3 * 5 * 4)  # three rows a piece
    assert torch.equal(dst, w[lo:hi])
    assert all(n <= 3 for n in sl.reads) and sum(sl.reads) == hi - lo


def test_copy_rows_refuses_a_mismatched_target() -> None:
    with pytest.raises(ValueError, match="3 rows into a tensor of 4"):
        copy_rows(None, 0, 3, torch.zeros(4, 2))
