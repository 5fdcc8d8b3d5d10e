"""The dataset's file names and its ``property`` file (``num_classes,height,width``).

A dataset is a prefix: ``PREFIX.rec``, ``PREFIX.idx`` (and its cache ``PREFIX.idx.npy``), and a property
file, ``PREFIX.property`` or, in the MS1M layout (prefix ``.../train``), ``<dir>/property``.
"""

from __future__ import annotations

import os
from pathlib import Path

from data_pipeline.atomic import atomic_write
from data_pipeline.key_ranges import FLOAT32_EXACT_LIMIT
from data_pipeline.record_format import RecordIOError

__all__ = ["prefix_path", "property_path", "property_text", "read_property", "write_property"]


def prefix_path(prefix: str | os.PathLike[str], suffix: str) -> Path:
    """``PREFIX`` + ``suffix`` (``.rec``, ``.idx``, ``.property``)."""
    # not Path.with_suffix: a prefix such as "faces_v1.2/train" must keep its dots
    return Path(f"{os.fspath(prefix)}{suffix}")


def property_path(prefix: str | os.PathLike[str]) -> Path:
    """Where the property file of ``prefix`` is: ``PREFIX.property`` if it exists, else ``<dir>/property``."""
    own = prefix_path(prefix, ".property")
    return own if own.is_file() else Path(prefix).parent / "property"


def read_property(prefix: str | os.PathLike[str]) -> tuple[int, int, int]:
    """``(num_classes, height, width)`` from the dataset's property file.

    Raises :class:`RecordIOError` naming the file(s) when it is missing or is not three positive
    integers separated by commas.
    """
    own = prefix_path(prefix, ".property")
    path = property_path(prefix)
    if not path.is_file():
        raise RecordIOError(f"property file missing: looked for {own} and {path}; it holds "
                            "'num_classes,height,width' (e.g. '85742,112,112')", path=path)
    text = path.read_text(errors="replace").strip()
    fields = [f.strip() for f in text.split(",")]
    try:
        if len(fields) != 3:
            raise ValueError
        num_classes, h, w = (int(f) for f in fields)
        if min(num_classes, h, w) <= 0:
            raise ValueError
    except ValueError:
        raise RecordIOError(f"malformed property {text[:80]!r}: expected 'num_classes,height,width', three "
                            "positive integers", path=path) from None
    if num_classes > FLOAT32_EXACT_LIMIT:
        raise RecordIOError(f"num_classes {num_classes} exceeds 2**24: class ids are stored as float32 "
                            "labels and would lose precision", path=path)
    return num_classes, h, w



def property_text(num_classes: int, image_size: tuple[int, int]) -> str:
    """A property file's content: ``num_classes,height,width`` and a newline."""
    return f"{num_classes},{image_size[0]},{image_size[1]}\n"


def write_property(path: str | os.PathLike[str], num_classes: int, image_size: tuple[int, int]) -> Path:
    """Write ``num_classes,height,width`` to the property file ``path`` (atomically: a dataset's property
    appears last, so a half-written dataset has none)."""
    return atomic_write(path, property_text(num_classes, image_size))
