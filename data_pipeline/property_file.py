"""The dataset's file names and its ``property`` file (``num_classes,height,width``).

A dataset is a prefix: ``PREFIX.rec``, ``PREFIX.idx`` (and its cache ``PREFIX.idx.npy``), and a property
file, ``PREFIX.property`` or, in the MS1M layout (prefix ``.../train``), ``<dir>/property``.

A ``train`` prefix can have both (``train.property`` from another tool or a copy beside insightface's
``property``): the reader refuses them when they disagree rather than silently take one, and our writer
writes ``<dir>/property`` and removes ``train.property`` with the old dataset, so what it wrote is read.
"""

from __future__ import annotations

import os
from pathlib import Path

from data_pipeline.atomic import Leftover, atomic_write, leftover_temps
from data_pipeline.key_ranges import FLOAT32_EXACT_LIMIT
from data_pipeline.record_format import RecordIOError

__all__ = ["dataset_files", "dataset_leftovers", "other_property_path", "prefix_path", "property_path",
           "property_text", "read_property", "write_property", "written_property_path"]

# the prefix name whose property file is ``<dir>/property`` (insightface's MS1M layout)
MS1M_NAME = "train"


def prefix_path(prefix: str | os.PathLike[str], suffix: str) -> Path:
    """``PREFIX`` + ``suffix`` (``.rec``, ``.idx``, ``.property``)."""
    # not Path.with_suffix: a prefix such as "faces_v1.2/train" must keep its dots
    return Path(f"{os.fspath(prefix)}{suffix}")


def property_path(prefix: str | os.PathLike[str]) -> Path:
    """Where the property file of ``prefix`` is: ``PREFIX.property`` if it exists, else ``<dir>/property``."""
    own = prefix_path(prefix, ".property")
    return own if own.is_file() else Path(prefix).parent / "property"


def written_property_path(prefix: str | os.PathLike[str]) -> Path:
    """The property file our writer writes for ``prefix``: ``<dir>/property`` for a prefix named ``train``
    (MS1M), else ``PREFIX.property``."""
    return Path(prefix).parent / "property" if Path(prefix).name == MS1M_NAME else prefix_path(prefix, ".property")


def other_property_path(prefix: str | os.PathLike[str]) -> Path | None:
    """The second property file a ``train`` prefix can have (``train.property``, which the reader would
    prefer to the ``<dir>/property`` the writer writes); None for other prefixes, whose ``<dir>/property``
    may be another dataset's (the MS1M ``train`` beside them)."""
    return prefix_path(prefix, ".property") if Path(prefix).name == MS1M_NAME else None


def dataset_files(prefix: str | os.PathLike[str]) -> list[Path]:
    """Every file name of the dataset ``prefix``: ``.rec``, ``.idx``, the index cache ``.idx.npy`` and its
    property file(s); what its writers' temporary files are named after."""
    names = [prefix_path(prefix, s) for s in (".rec", ".idx", ".idx.npy", ".property")]
    return names + ([written_property_path(prefix)] if Path(prefix).name == MS1M_NAME else [])


def dataset_leftovers(prefix: str | os.PathLike[str]) -> list[Leftover]:
    """The temporary files and backups (:func:`~data_pipeline.atomic.leftover_temps`) of every file name of
    the dataset ``prefix``: what a killed write or overwrite of it left."""
    return [left for name in dataset_files(prefix) for left in leftover_temps(name)]


def read_property(prefix: str | os.PathLike[str]) -> tuple[int, int, int]:
    """``(num_classes, height, width)`` from the dataset's property file.

    Raises :class:`RecordIOError` naming the file(s) when it is missing, is not three positive
    integers separated by commas, or when a ``train`` prefix has both ``train.property`` and
    ``<dir>/property`` and they disagree (one is stale; which one cannot be told from here).
    """
    own = prefix_path(prefix, ".property")
    path = property_path(prefix)
    if not path.is_file():
        raise RecordIOError(f"property file missing: looked for {own} and {path}; it holds "
                            "'num_classes,height,width' (e.g. '85742,112,112')", path=path)
    values = _parse_property(path)
    shared = written_property_path(prefix)
    # a train prefix with both files: train.property is read first, but either may be the stale one
    theirs = _parse_property(shared) if path == other_property_path(prefix) and shared.is_file() else values
    if theirs != values:
        raise RecordIOError(f"two property files disagree: {own} says {_text(values)}, {shared} says "
                            f"{_text(theirs)}; delete the stale one (`pfc data pack` writes {shared} for a "
                            f"prefix named '{MS1M_NAME}')", path=own)
    return values


def _text(values: tuple[int, int, int]) -> str:
    return repr(",".join(str(v) for v in values))


def _parse_property(path: Path) -> tuple[int, int, int]:
    """Three positive integers from the property file ``path``, or :class:`RecordIOError` naming it."""
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
