"""Strict JSON (RFC 8259), with ``null`` for a number that is not finite: what the files a run or a command
writes for other programs are (``metrics.jsonl``, ``summary.json``, ``best.json``, ``eval.json``, every
``--json PATH``, the studies' results; docs/formats.md).

Python's ``json`` writes NaN and infinities as the bare tokens ``NaN`` and ``Infinity``, which are no JSON:
jq, JavaScript's ``JSON.parse``, Go and log shippers reject the whole document (or line of
``metrics.jsonl``). A non-finite float is written as ``null`` instead, its field kept ("not a finite
number": the step or the measurement was there); the readers that compute on such a file turn a null back
into NaN with :func:`nan_for_null`.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["dumps", "finite_or_null", "nan_for_null"]


def finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float in it (through dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(v) for v in value]
    return value


def _number(value: Any) -> float | None:
    """A value json cannot write itself (a NumPy scalar, a 0-d tensor) as a float, None when not finite."""
    number = float(value)
    return number if math.isfinite(number) else None


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``obj`` as strict JSON: non-finite floats as ``null``, other non-JSON scalars
    through ``float``. ``allow_nan=False`` keeps a non-finite value that escaped the conversion a loud
    ``ValueError`` rather than a file other programs cannot read."""
    return json.dumps(finite_or_null(obj), allow_nan=False, default=_number, **kwargs)


def nan_for_null(record: dict[str, Any]) -> dict[str, Any]:
    """A ``metrics.jsonl`` record (flat: every field a number) with its null fields as NaN, the number that
    was logged; a record written before nulls (with NaN tokens, which ``json.loads`` reads) is unchanged."""
    return {k: math.nan if v is None else v for k, v in record.items()}
