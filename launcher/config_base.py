"""The base of every config section (:class:`Section`): unknown keys refused, flags and numbers kept
apart; and the one range check that the sections' (low, high) fields share."""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _accepts_bool(annotation: Any) -> bool:
    """Whether a field's type admits ``True``/``False`` (``bool``, ``bool | None``, a Literal of bools)."""
    if annotation is bool:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(a, bool) for a in get_args(annotation))
    return any(_accepts_bool(a) for a in get_args(annotation))


def _is_bool(annotation: Any) -> bool:
    """Whether a field is a flag: ``bool`` or ``bool | None``."""
    return annotation is bool or (bool in get_args(annotation) and all(a in (bool, type(None))
                                                                       for a in get_args(annotation)))


class Section(BaseModel):
    """A config section: every field typed, unknown keys refused (a typo names the field)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_bools(cls, v: Any, info: ValidationInfo) -> Any:
        """No silent conversion between flags and numbers: pydantic's lax mode turns ``True`` into ``1``
        (an int field) or ``1.0``, and YAML reads ``on``/``yes``/``true`` as ``True``, so
        ``--set train.batch_size=on`` would become a batch of 1. Refused here, naming the field."""
        field = cls.model_fields.get(info.field_name or "")
        if field is None:
            return v
        if isinstance(v, bool) and not _accepts_bool(field.annotation):
            raise ValueError(f"expected {_kind(field.annotation)}, got the boolean {v} (YAML reads "
                             "on/off/yes/no/true/false as booleans)")
        if _is_bool(field.annotation) and v is not None and not isinstance(v, bool):
            raise ValueError(f"expected true or false, got {v!r}")
        return v


def _kind(annotation: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string"}
    args = [a for a in (get_args(annotation) or (annotation,)) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    return " or ".join(names.get(a, getattr(a, "__name__", str(a))) for a in args) or str(annotation)


def ordered_range(name: str, v: tuple[float, float], lo: float, hi: float, lo_open: bool = False) -> None:
    """Refuse a (low, high) range that is reversed or leaves [lo, hi] ((lo, hi] with ``lo_open``)."""
    a, b = v
    low_ok = a > lo if lo_open else a >= lo
    if not (low_ok and a <= b <= hi):
        bound = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
        raise ValueError(f"{name} {list(v)} must be [low, high] with low <= high, both in {bound}")

