"""Fine-tuning pieces the training loop calls through small hooks (issue 15, item 3).

* :func:`adopt_init_backbone`: ``checkpoint.init_backbone`` as users give it (a weight file -- ours or
  insightface's ``.pth`` --, a checkpoint or a run folder) resolved to a file, and the network's
  architecture taken from that file for every ``model`` field the config leaves unset; a field set
  explicitly to something else is an error naming both.
* :func:`backbone_frozen` / :func:`set_backbone_mode`: ``train.freeze_backbone_steps`` -- for the first
  N steps only the head learns: the backbone optimizer does not step (weights and its state stay as
  loaded) and the backbone runs in eval mode (BatchNorm statistics stay those of the loaded weights).
  Its gradients are still computed (DDP requires every parameter's gradient once it is built); the
  cost is one backward pass per frozen step. The LR schedules keep counting through the frozen steps
  (they span ``train.steps``), so the backbone starts at the schedule's value for step N + 1.
* :class:`BestKeeper`: ``checkpoint.keep_best: <bin>:<metric>`` -- after each evaluation, when the
  metric beats the best seen (strictly), the backbone is written to ``OUTPUT/best/backbone.safetensors``
  with ``best.json`` (step, metric, value, history); checkpoint pruning never touches it, so
  over-training cannot leave the run without its best model. ``pfc eval/embed/export OUTPUT/best``
  take it. A resumed run reads ``best.json`` and only replaces the file with something better.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from data_pipeline.atomic import atomic_write
from launcher import strict_json
from launcher.config import Config, validate_tree

log = logging.getLogger("pfc")

#: model fields a backbone file determines
_ARCH_FIELDS = ("backbone", "embedding_size", "image_size", "width", "scale", "blocks")


def adopt_init_backbone(cfg: Config) -> Config:
    """``cfg`` with ``checkpoint.init_backbone`` resolved to a weight file and ``model`` matching it.

    No-op without ``init_backbone``. Raises ValueError naming the field when the file cannot be used
    or disagrees with a ``model`` field that the config sets explicitly.
    """
    init = cfg.checkpoint.init_backbone
    if not init:
        return cfg
    from launcher.model_files import resolve_backbone_file
    from partialfc.backbones import read_backbone_config

    try:
        path = resolve_backbone_file(init)
        file_cfg = read_backbone_config(path)
    except FileNotFoundError as exc:
        # a resume never reads the file (the checkpoint's weights win): a fine-tune whose pretrained file
        # is gone (a scratch disk, another node) still resumes, with the model its checkpoint was saved with
        from launcher.trainer.run_folder import resume_point

        latest = resume_point(cfg)
        if latest is None:
            raise ValueError(f"checkpoint.init_backbone: {exc}") from None
        return _adopt_resumed(cfg, latest, _saved_model(latest, exc), exc)
    except ValueError as exc:
        raise ValueError(f"checkpoint.init_backbone: {exc}") from None
    size = file_cfg["image_size"]
    if not isinstance(size, int):
        if size[0] != size[1]:
            raise ValueError(f"checkpoint.init_backbone: {path} holds a network for {size[0]}x{size[1]} images; "
                             "training takes square images (model.image_size)")
        size = int(size[0])
    wanted: dict[str, Any] = {"backbone": file_cfg["name"], "embedding_size": int(file_cfg["embedding_size"]),
                              "image_size": size, "width": float(file_cfg["width"]),
                              "scale": int(file_cfg.get("scale", 1)),
                              "blocks": tuple(file_cfg["blocks"]) if "blocks" in file_cfg else None}
    explicit = cfg.model.model_fields_set
    for name in _ARCH_FIELDS:
        have = getattr(cfg.model, name)
        if name in explicit and have != wanted[name]:
            raise ValueError(f"model.{name}={have!r} but checkpoint.init_backbone {path} holds "
                             f"{name}={wanted[name]!r}: set model.{name}={wanted[name]!r} or leave it unset to take it "
                             "from the file")
    adopted = _updated(cfg, wanted, f"model from checkpoint.init_backbone {path}", init_backbone=str(path))
    changed = [f"{n}={wanted[n]!r}" for n in _ARCH_FIELDS if getattr(cfg.model, n) != wanted[n]]
    if changed:
        log.info(f"model from checkpoint.init_backbone {path}: {', '.join(changed)}")
    return adopted


def _saved_model(latest: Path, missing: FileNotFoundError) -> dict[str, Any]:
    """The ``model`` section the checkpoint ``latest`` was saved with. Unreadable, the run can neither start
    (no pretrained file) nor resume: the error says both, since restoring the file alone would not do."""
    try:
        model = json.loads((latest / "meta.json").read_text())["config"]["model"]
        if not isinstance(model, dict):
            raise TypeError(f"config.model is {type(model).__name__}, expected a mapping")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"checkpoint.init_backbone: {missing}; and the checkpoint the run would resume from "
                         f"instead, {latest}, has no readable model config in its meta.json ({type(err).__name__}: "
                         f"{err})") from None
    return model


def _adopt_resumed(cfg: Config, latest: Path, saved: dict[str, Any], missing: FileNotFoundError) -> Config:
    """``cfg`` with every architecture field it leaves unset taken from the checkpoint it resumes from; one
    it sets is kept (the resume refuses it, naming both values, if it differs from the checkpoint's)."""
    explicit = cfg.model.model_fields_set
    wanted = {n: (tuple(saved[n]) if n == "blocks" and saved[n] is not None else saved[n])
              for n in _ARCH_FIELDS if n in saved and n not in explicit}
    log.info(f"checkpoint.init_backbone: {missing}; resuming from {latest}, whose weights a resume loads "
             f"instead: model from its config ({', '.join(f'{n}={v!r}' for n, v in wanted.items())})")
    return _updated(cfg, wanted, f"model from checkpoint {latest}")


def _updated(cfg: Config, model: dict[str, Any], source: str, init_backbone: str | None = None) -> Config:
    """``cfg`` with the ``model`` fields (and ``checkpoint.init_backbone``) replaced, validated again: the
    config's rules for the model (model.dropout with a ViT, model.drop_path without one...) judge the adopted
    backbone, and a refusal is one line naming ``source`` (a ConfigError, as any other config's). Fields
    ``cfg`` leaves unset stay unset, but for those replaced (as ``model_copy(update=...)`` would)."""
    tree = cfg.model_dump(exclude_unset=True)
    tree["model"] = {**tree.get("model", {}), **model}
    if init_backbone is not None:
        tree["checkpoint"] = {**tree.get("checkpoint", {}), "init_backbone": init_backbone}
    return validate_tree(tree, source)


def backbone_frozen(cfg: Config, step: int) -> bool:
    """Whether optimizer step ``step`` (1-based) leaves the backbone untouched."""
    return step <= cfg.train.freeze_backbone_steps


def skip_backbone_step(engine: Any) -> None:
    """A frozen step: the backbone's schedule advances, its optimizer does not step."""
    with warnings.catch_warnings():
        # torch warns when a scheduler steps before its optimizer ever has: intended while frozen
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        engine.skip()


def set_backbone_mode(engine: Any, cfg: Config, step: int) -> None:
    """Before step ``step``: eval mode while frozen (BN statistics kept), train mode at the first free step."""
    n = cfg.train.freeze_backbone_steps
    if n and step <= n:
        engine.train(False)
    elif n and step == n + 1:
        engine.train(True)
        log.info(f"step {step}: backbone unfrozen after {n} head-only steps")


def _metric_value(evals: dict[str, Any], spec: str) -> float:
    bin_name, _, metric = spec.rpartition(":")
    # without a bin name: the first of data.val_bins (evals keeps their order)
    found = [r for k, r in evals.items() if not bin_name or bin_name in (k, Path(k).stem)]
    if not found:
        raise KeyError(f"checkpoint.keep_best: no evaluation of {bin_name!r} (evaluated: {sorted(evals)})")
    r = found[0]
    value = r["accuracy"] if metric == "accuracy" else r["tar_at_far"][metric.split("@", 1)[1]]
    return float("nan") if value is None else float(value)


class BestKeeper:
    """Keeps ``OUTPUT/best`` = the backbone with the highest ``checkpoint.keep_best`` metric so far."""

    def __init__(self, cfg: Config, is_main: bool, resumed_at: int | None = None) -> None:
        """``resumed_at``: the step the run resumes from; the record's evaluations after it (of the run's
        lost stretch, which the resumed run repeats) leave the history. The best value and backbone stay:
        they were measured, and only a better one replaces them."""
        self.spec = cfg.checkpoint.keep_best
        self.folder = Path(cfg.output) / "best"
        self.is_main = is_main
        self.best: float | None = None
        self.history: list[dict[str, Any]] = []
        record = self.folder / "best.json"
        if self.spec and record.is_file():  # resumed run: only something better replaces it
            saved = json.loads(record.read_text())
            if saved.get("metric") == self.spec:
                # null: no evaluation so far gave a finite value (a TAR the set has too few pairs for)
                self.best = None if saved.get("value") is None else float(saved["value"])
                self.history = [h for h in saved.get("history", []) if not isinstance(h, dict)
                                or resumed_at is None or h.get("step", 0) <= resumed_at]
        kept = self._kept_value()
        if kept is not None and (self.best is None or kept > self.best):
            # the backbone is written before best.json: a run stopped between the two left a better
            # backbone than the record says, which only a better one may replace
            self.best = kept

    def _kept_value(self) -> float | None:
        """The metric value the kept backbone was saved with (its safetensors metadata, read without its
        tensors), or None when there is none for this run's ``keep_best``."""
        from safetensors import safe_open

        from partialfc.backbones import METADATA_KEY

        weights = self.folder / "backbone.safetensors"
        if not self.spec or not weights.is_file():
            return None
        try:
            with safe_open(str(weights), framework="pt") as f:
                config = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
        except (OSError, SafetensorError, json.JSONDecodeError):
            return None  # unreadable: the next best replaces it
        value = config.get("value") if isinstance(config, dict) and config.get("keep_best") == self.spec else None
        return float(value) if isinstance(value, int | float) else None

    def observe(self, step: int, evals: dict[str, Any] | None, backbone: Any,
                backbone_config: dict[str, Any]) -> bool:
        """After an evaluation: save the backbone when it is the best so far. Returns whether it was."""
        if not self.spec or not evals:
            return False
        value = _metric_value(evals, self.spec)
        self.history.append({"step": step, "value": value})
        better = value == value and (self.best is None or value > self.best)  # NaN never wins
        if not self.is_main:
            if better:
                self.best = value
            return better
        try:
            if better:
                from data_pipeline.atomic import atomic_write
                from partialfc.backbones import save_backbone

                save_backbone(backbone, self.folder / "backbone.safetensors",
                              config={**backbone_config, "step": step, "keep_best": self.spec, "value": value},
                              write=atomic_write)
                self.best = value
                log.info(f"step {step}: {self.spec} = {value:.4f}, the best so far -> {self.folder}")
            self._write_record(step if better else None)
        except (OSError, SafetensorError) as exc:  # a full disk (safetensors raises its own type for it):
            # training goes on; the previous best file stays as it was
            log.error(f"step {step}: could not keep the best backbone in {self.folder}: {exc}")
            return False
        return better

    def _write_record(self, step: int | None) -> None:
        record = self.folder / "best.json"
        old = json.loads(record.read_text()) if record.is_file() else {}
        payload = {"metric": self.spec, "value": self.best,
                   "step": step if step is not None else old.get("step"), "history": self.history}
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(record, strict_json.dumps(payload, indent=2) + "\n")  # an undefined metric as null
