"""One typed training configuration: defaults < YAML file < command-line ``--set a.b=value``.

Every section forbids unknown keys, so a typo (``optim.lrr``) is an error naming the field rather than
a silently ignored setting. The resolved config is written into the run folder (``config.yaml``) and
into every checkpoint.

Where it lives: the sections and :class:`Config` in ``launcher/config_schema.py`` (``data.augment``'s in
``config_augment.py``, their base in ``config_base.py``); here, loading a file, ``--set`` overrides, the
built-in recipes, and every name the rest of the code imports from ``launcher.config``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from launcher import errors
from launcher.config_augment import (
    AugmentConfig,
    ColorAugment,
    CropAugment,
    ErasingAugment,
    GrayscaleAugment,
    RotationAugment,
    ShiftAugment,
)
from launcher.config_base import Section
from launcher.config_schema import (
    KEEP_BEST_METRICS,
    VIT_BACKBONES,
    CheckpointConfig,
    Config,
    DataConfig,
    DistConfig,
    EvalConfig,
    HeadConfig,
    LogConfig,
    MetricsConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    val_set_name,
)

__all__ = [
    "KEEP_BEST_METRICS", "VIT_BACKBONES", "AugmentConfig", "CheckpointConfig", "ColorAugment", "Config",
    "ConfigError", "CropAugment", "DataConfig", "DistConfig", "ErasingAugment", "EvalConfig",
    "GrayscaleAugment", "HeadConfig", "LogConfig", "MetricsConfig", "ModelConfig", "OptimConfig",
    "RotationAugment", "ShiftAugment", "TrainConfig", "build_overrides", "builtin_config", "dump_config",
    "ignored_settings", "load_config", "parse_override", "resolve_config_path", "val_set_name",
    "validate_tree",
]


log = logging.getLogger("pfc")


class ConfigError(ValueError):
    """A config that cannot be loaded or validated; the message names the field and the value."""


#: metrics fields that only the exporter and the Pushgateway read. Not metrics.run_id: it is also the run
#: identity written to <output>/run_id, which a resume keeps (launcher/commands/train.py kept_run_label)
#: (nor metrics.host: deploy/slurm, deploy/k8s and docker/compose set it for every job, metrics on or off)
_EXPORTER_ONLY = ("port_base", "port_policy", "pushgateway", "push_interval_s", "job")

#: warnings already given by this process (`pfc train` loads its config again after packing an image folder)
_warned: set[str] = set()


def ignored_settings(cfg: Config) -> list[str]:
    """One line per group of settings that ``cfg`` gives but that have no effect. A field counts when the
    config sets it (``model_fields_set``) to something other than its default: a run folder's config.yaml
    sets every field, and passed back to `pfc train` must not warn about the defaults in it."""
    lines = []
    m = cfg.metrics
    given = _changed(m, _EXPORTER_ONLY, "metrics")
    if given and not m.enabled:
        lines.append(_no_effect(given, "metrics.enabled is false, so no exporter serves and nothing is pushed; "
                                f"set metrics.enabled=true to use {'it' if len(given) == 1 else 'them'}"))
    given = _changed(cfg.log, ("wandb_project", "wandb_mode"), "log")
    if given and "wandb" not in cfg.log.backends:
        backends = f"log.backends ({', '.join(cfg.log.backends)}) has" if cfg.log.backends else "log.backends is empty:"
        lines.append(_no_effect(given, f"{backends} no wandb; add wandb to log.backends to log to W&B"))
    return lines


def _no_effect(given: list[str], why: str) -> str:
    return f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect: {why}"


def _changed(section: BaseModel, names: tuple[str, ...], prefix: str) -> list[str]:
    """``prefix.name`` of the fields of ``names`` that ``section`` sets to other than their defaults."""
    fields = type(section).model_fields
    return [f"{prefix}.{n}" for n in names
            if n in section.model_fields_set and getattr(section, n) != fields[n].default]


def _warn_ignored(cfg: Config) -> None:
    """Log :func:`ignored_settings` once per launch: in `pfc train`'s own process, not again in each of the
    ranks it starts (they have ``PFC_ERROR_DIR``); rank 0 of an outside launcher (torchrun, srun) says it."""
    rank = errors.rank_from_env()
    if rank not in (None, 0) or (rank == 0 and os.environ.get(errors.ERROR_DIR_ENV)):
        return
    for line in ignored_settings(cfg):
        if line not in _warned:
            _warned.add(line)
            log.warning(line)


def _format_validation_error(err: ValidationError, source: str) -> str:
    """One line for one error (a check across sections by its message alone), else one line per error."""
    items = []
    for e in err.errors():
        msg = str(e["msg"]).removeprefix("Value error, ")
        if not e["loc"]:  # a check across sections (Config's own validators): the message names the fields
            items.append(msg)
            continue
        field = ".".join(str(p) for p in e["loc"])
        value = e.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        items.append(f"{field} = {shown}: {msg}")
    if len(items) == 1:
        return f"invalid configuration ({source}): {items[0]}"
    return "\n".join([f"invalid configuration ({source}):", *(f"  {i}" for i in items)])


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML so numbers, lists and nulls work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.field=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r} has an empty field name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
    return path, value


def _apply(tree: dict[str, Any], path: list[str], value: Any, item: str) -> None:
    node = tree
    for i, p in enumerate(path[:-1]):
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(path[:i + 1])} holds {nxt!r}, not a section of fields")
        node = nxt
    node[path[-1]] = value


def _null_sections_to_defaults(tree: dict[str, Any], model: type[BaseModel] = Config) -> None:
    """In place: a section given as null becomes ``{}``, that is its defaults, at any depth.

    YAML reads ``optim:`` with every key under it commented out as ``optim: null`` (JSON writes it
    ``"optim": null``); users mean "the defaults", not a type error or, with ``--set optim.lr=...``,
    a claim that ``optim`` is no section. Only fields typed as a section are touched: a null plain field
    stays for validation to name."""
    for name, field in model.model_fields.items():
        section = field.annotation
        if name not in tree or not (isinstance(section, type) and issubclass(section, Section)):
            continue
        if tree[name] is None:
            tree[name] = {}
        elif isinstance(tree[name], dict):
            _null_sections_to_defaults(tree[name], section)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then ``overrides`` (``section.field=value``)."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(loaded).__name__}")
        tree = loaded
        source = str(p)
    _null_sections_to_defaults(tree)
    for item in overrides or []:
        keys, value = parse_override(item)
        _apply(tree, keys, value, item)
        _null_sections_to_defaults(tree)  # `--set optim=null`, as in a file, is the section's defaults
    if overrides:
        source += " + --set " + " ".join(overrides)
    cfg = validate_tree(tree, source)
    _warn_ignored(cfg)
    return cfg


def validate_tree(tree: dict[str, Any], source: str) -> Config:
    """``tree`` (sections of fields, as a YAML file holds them) validated; refused as a :class:`ConfigError`
    whose message names ``source``, the field and the value."""
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def set_value(value: str | list[str] | None) -> str:
    """``value`` as the right-hand side of a ``--set key=VALUE``, which is read back as YAML: strings
    double-quoted with YAML's own escapes (``json.dumps`` writes a character beyond U+FFFF as a surrogate
    pair, which YAML reads back as two lone surrogates: a path no file system takes), on one line."""
    if value is None:
        return "null"
    return str(yaml.safe_dump(value, default_flow_style=True, default_style='"', width=float("inf"))).rstrip("\n")


def build_overrides(data: str | None, val_bin: list[str] | None, output: str | None,
                    sets: list[str] | None) -> list[str]:
    """`pfc train`'s short flags (``--data``, ``--val-bin``, ``--output``) as ``--set`` items, for anything
    that starts a run with those three; explicit ``sets`` come last and win."""
    out: list[str] = []
    if data is not None:
        out.append(f"data.prefix={set_value(data)}")
    if val_bin:
        out.append(f"data.val_bins={set_value(list(val_bin))}")
    if output is not None:
        out.append(f"output={set_value(output)}")
    return out + list(sets or [])


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def builtin_config(name: str) -> Path:
    """Path of a recipe shipped in ``launcher/configs`` (``demo_cpu`` or ``demo_cpu.yaml``)."""
    here = Path(__file__).parent / "configs"
    p = here / (name if name.endswith(".yaml") else name + ".yaml")
    if not p.is_file():
        known = ", ".join(sorted(q.stem for q in here.glob("*.yaml")))
        raise ConfigError(f"no built-in config {name!r}; built-in recipes: {known}")
    return p


def resolve_config_path(arg: str) -> Path:
    """A path to a YAML file, or the name of a built-in recipe (``demo_cpu``). A path with a folder in it
    names a file only: a missing one is an error, never the built-in recipe of the same name (a typo in the
    path to an edited copy would otherwise train the stock recipe)."""
    p = Path(arg)
    if p.is_file():
        return p
    if len(p.parts) > 1:
        raise ConfigError(f"config file {p} does not exist")
    try:
        return builtin_config(p.name)
    except ConfigError as e:
        raise ConfigError(f"config file {p} does not exist, and {e}") from None
