"""The streaming safetensors writer and row reader of the head's checkpoint (partialfc/safetensors_stream.py):
the bytes of safetensors' own ``save_file``, read back by safetensors,; rows read a bounded piece at a time
(the host memory of a GPU shard's save: tests/gpu/test_head_file_memory.py)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from partialfc.safetensors_stream import copy_rows, save_file_streaming


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


def test_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'w' is not contiguous"):
        save_file_streaming({"w": torch.zeros(4, 3).t()}, tmp_path / "a.safetensors")
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
