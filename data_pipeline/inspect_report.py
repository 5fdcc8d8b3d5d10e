"""The human summary of a dataset inspection (``pfc data inspect`` without ``--json``).

The report is the JSON-ready dict :func:`data_pipeline.checks.inspect_dataset` returns; this module only
formats it, one aligned line per fact, the first 50 corrupt records listed by key and byte offset.
"""

from __future__ import annotations

import os
from typing import Any

from data_pipeline.property_file import dataset_leftovers, prefix_path, read_property
from data_pipeline.recordio import RecordIOError

__all__ = ["format_report", "leftover_note", "leftover_warnings", "note_image_sizes"]


def format_report(report: dict[str, Any]) -> str:
    """Human summary of :func:`inspect_dataset`'s report."""
    lines = [f"dataset     {report['prefix']}"]
    if report["num_classes"] is not None:
        lines.append(f"property    {report['num_classes']} classes, {report['image_size'][0]}x"
                     f"{report['image_size'][1]}")
    lines.append(f"records     {report['records']}"
                 + (f" (header: identity records [{report['header'][0]}, {report['header'][1]}))"
                    if report["header"] else ""))
    lines.append(f"images      {report['images']}"
                 + (f" (from the index; {report['checked']} sampled records checked)"
                    if report.get("sampled") is not None else ""))
    lines.append(f"identities  {report['identities']}")
    ipi = report["images_per_identity"]
    if ipi:
        lines.append(f"per identity min {ipi['min']}  max {ipi['max']}  mean {ipi['mean']:.2f}  "
                     f"median {ipi['median']:g}")
    if report["deep"]:
        lines.append(f"decoded     {report['decoded']} images"
                     + (f" ({', '.join(f'{s}: {n}' for s, n in report['image_sizes'].items())})"
                        if report["image_sizes"] else ""))
    for w in report["warnings"]:
        lines.append(f"warning     {w}")
    for e in report["errors"]:
        lines.append(f"error       {e}")
    if report["corrupt"]:
        lines.append(f"CORRUPT     {len(report['corrupt'])} records:")
        for c in report["corrupt"][:50]:
            lines.append(f"  key {c['key']} at byte offset {c['offset']}: {c['error']}")
        if len(report["corrupt"]) > 50:
            lines.append(f"  ... and {len(report['corrupt']) - 50} more (see --json)")
    lines.append("status      " + ("OK" if report["ok"] else "FAILED"))
    return "\n".join(lines)



def leftover_warnings(prefix: str | os.PathLike[str]) -> list[str]:
    """One warning per temporary file of the dataset's names that a write which did not finish left
    (a killed ``pfc data pack``), and per old file a killed overwrite left set aside (a backup), with
    its size and whether the next pack to ``prefix`` removes it."""
    out = []
    swapped = _new_dataset_placed(prefix)
    for left in dataset_leftovers(prefix):
        fate = ("its writer is gone: the next `pfc data pack` to this prefix removes it, or delete it"
                if left.gone else "its writer may still be running (a live pid or another host): delete it "
                "once no write of this dataset runs")
        if left.backup and swapped:
            out.append(f"backup {left.describe()} of the old {left.final}, left by an overwrite that had put the new "
                       f"dataset in place (its .rec, .idx and property): delete it, do not rename it back (the "
                       f"other backups may be gone already: the old files would meet the new ones); {fate}")
        elif left.backup:
            out.append(f"backup {left.describe()} of the old {left.final}, set aside by an overwrite that did not "
                       f"finish (renamed back to {left.final} with the other backups, it is the old dataset's "
                       f"file); {fate}")
        else:
            out.append(f"leftover temporary file {left.describe()} from a write that did not finish; {fate}")
    return out


def _new_dataset_placed(prefix: str | os.PathLike[str]) -> bool:
    """Whether the final names hold a ``.rec``, an ``.idx`` and a readable property file. An overwrite sets
    the old property aside before the old pair and places the new one after the new pair
    (``RecordWriter.close``): while backups exist, that is only so once the new dataset is whole, when the
    backups are being removed, some may be gone, and renaming the rest back would mix old and new."""
    if not (prefix_path(prefix, ".rec").is_file() and prefix_path(prefix, ".idx").is_file()):
        return False
    try:
        read_property(prefix)
    except (RecordIOError, OSError, ValueError):
        return False
    return True


def leftover_note(prefix: str | os.PathLike[str]) -> str:
    """The leftovers of ``prefix``'s names in one clause for an error line (where there is no dataset to
    inspect: a killed first pack), each with whether its writer is gone; "" when there are none."""
    found = [left.describe(f"{f'a backup of the old {left.final}, ' if left.backup else ''}its writer "
                           f"{'is gone' if left.gone else 'may still be running'}")
             for left in dataset_leftovers(prefix)]
    if not found:
        return ""
    return (f"; a write to {prefix} that did not finish left " + ", ".join(found)
            + ": the next `pfc data pack` to this prefix removes those whose writer is gone")


def note_image_sizes(report: dict[str, Any]) -> None:
    """``--deep``: the warning that decoded images are not the property file's size (replacing an earlier
    one), from the report's ``image_sizes`` counts."""
    sizes: dict[str, int] = report["image_sizes"]
    if report["image_size"] is None or not sizes:
        return
    want = f"{report['image_size'][0]}x{report['image_size'][1]}"
    other = sum(v for s, v in sizes.items() if s != want)
    msg = [w for w in report["warnings"] if not w.endswith("as the property file says")]
    if other:
        msg.append(f"{other} images are not {want} as the property file says")
    report["warnings"][:] = msg
