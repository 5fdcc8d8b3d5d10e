"""The ``.idx`` parser on unusual files: bare-CR line ends, blocks cut mid-line, a file that grows while
it is read, integers outside int64."""

from __future__ import annotations

from pathlib import Path
from typing import IO

import pytest

from data_pipeline import index_file
from data_pipeline.index_file import parse_index
from data_pipeline.record_format import RecordIOError


def test_bare_cr_crlf_and_lf_line_ends(tmp_path: Path) -> None:
    """MXNet's text-mode readlines() (and DALI) read a bare CR as a line end; so does the parser."""
    p = tmp_path / "cr.idx"
    p.write_bytes(b"0\t0\r1\t100\r")
    assert parse_index(p).tolist() == [[0, 0], [1, 100]]
    p.write_bytes(b"0\t0\r\n1\t100\r2\t200\n\r3\t300")   # mixed, a blank line, no final line end
    assert parse_index(p).tolist() == [[0, 0], [1, 100], [2, 200], [3, 300]]


@pytest.mark.parametrize("block", range(1, 14))
def test_line_ends_and_line_numbers_whatever_the_block_cuts(tmp_path: Path, block: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks cut anywhere (a CRLF split between two blocks is one line end): the same rows, and a bad
    line is named by its number counting every kind of line end."""
    monkeypatch.setattr(index_file, "_IDX_BLOCK_BYTES", block)
    p = tmp_path / "mixed.idx"
    p.write_bytes(b"0\t0\r\n1\t100\r\r\n2\t200\n3\t300\r")
    assert parse_index(p).tolist() == [[0, 0], [1, 100], [2, 200], [3, 300]]
    p.write_bytes(b"0\t0\r\n1\t100\r\r\n2\t200\nx\t300\r")
    with pytest.raises(RecordIOError, match=r"line 5 is b'x\\t300'"):
        parse_index(p)


def test_file_growing_while_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows appended after the first (counting) pass are parsed too: the table grows to hold them."""
    p = tmp_path / "grow.idx"
    p.write_bytes(b"0\t0\n1\t100\n2\t200\n")
    count = index_file._count_lines

    def count_then_append(f: IO[bytes], size: int) -> int:
        lines = count(f, size)
        with open(p, "ab") as g:
            g.write(b"3\t300\n4\t400\n")
        return lines

    monkeypatch.setattr(index_file, "_count_lines", count_then_append)
    assert parse_index(p).tolist() == [[k, 100 * k] for k in range(5)]
    monkeypatch.setattr(index_file, "_IDX_BLOCK_BYTES", 7)   # several blocks, growing after the first
    p.write_bytes(b"0\t0\n1\t100\n2\t200\n")
    assert parse_index(p).tolist() == [[k, 100 * k] for k in range(5)]


@pytest.mark.parametrize(("line", "value"), [
    (b"99999999999999999999\t100", "99999999999999999999"),
    (b"1\t99999999999999999999", "99999999999999999999"),
    (b"%d\t100" % 2**63, str(2**63)),
    (b"1\t%d" % 2**63, str(2**63)),
    (b"-%d\t100" % (2**63 + 1), str(2**63 + 1)),
])
def test_integers_outside_int64_are_errors_not_clamped(tmp_path: Path, line: bytes, value: str) -> None:
    p = tmp_path / "big.idx"
    p.write_bytes(b"0\t0\n" + line + b"\n2\t200\n")
    with pytest.raises(RecordIOError, match=f"line 2 is .*{value}.*64-bit integer range") as err:
        parse_index(p)
    assert err.value.path == str(p)


def test_int64_bounds_themselves_are_read(tmp_path: Path) -> None:
    p = tmp_path / "edge.idx"
    p.write_bytes(b"%d\t0\n%d\t%d\n" % (2**63 - 1, -(2**63), 2**63 - 1))
    assert parse_index(p).tolist() == [[2**63 - 1, 0], [-(2**63), 2**63 - 1]]
