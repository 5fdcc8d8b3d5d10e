"""Shared pieces of the monitoring tests: the deploy/ files, PromQL metric names, a fake exporter run."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.ports import free_port  # noqa: F401 (the tests of this folder import it from here)

REPO = Path(__file__).resolve().parents[3]
PROM_DIR = REPO / "deploy" / "prometheus"
GRAFANA_DIR = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "pfc-training.json"

# Series that come from Prometheus itself or from NVIDIA's dcgm-exporter, not from our exporter.
PROMETHEUS_BUILTIN = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS"}
DCGM_SERIES = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE",
               "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"}
# Series that exist only on GPU ranks (absent, not zero, on the CPU run of the live test).
GPU_ONLY_PREFIXES = ("pfc_cuda_", "pfc_gpu_", "DCGM_")

# Values the dashboard's Grafana variables take in the tests.
GRAFANA_VARS = {"$__rate_interval": "5s", "$__interval": "1s", "$__range": "1m", "${datasource}": "prom",
                "$dcgm_job": ".*", "$job": "pfc.*", "$rank": ".*", "$run": ".*", "$instance": ".*", "$host": ".*"}

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
             "bool", "inf", "nan", "start", "end"}
_LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_TOKEN = re.compile(r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<number>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?[a-zA-Z]*)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<open>[({\[])
  | (?P<close>[)}\]])
  | (?P<other>\S)
""", re.VERBOSE)


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects.

    A small lexer, enough for our queries: it drops strings, durations, label matchers
    (``{...}``), ranges (``[...]``) and the label lists after ``by``/``without``/``on``/
    ``ignoring``/``group_*``; an identifier followed by ``(`` is a function. ``{__name__=...}``
    selectors are refused, so a name cannot hide from the check.
    """
    if "__name__" in expr:
        raise ValueError(f"selector by __name__ is not checkable: {expr}")
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    names: set[str] = set()
    depth: list[str] = []  # open brackets that hide their content ({ and [ and label lists)
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        if kind == "open":
            if text in "{[" or (depth and depth[-1] == "hide"):
                depth.append("hide")
            else:
                prev = tokens[i - 1] if i else (None, "")
                depth.append("hide" if prev[0] == "ident" and prev[1].lower() in _LABEL_LIST_KEYWORDS else "expr")
        elif kind == "close":
            if not depth:
                raise ValueError(f"unbalanced {text!r} in {expr}")
            depth.pop()
        elif kind == "ident" and not (depth and depth[-1] == "hide"):
            nxt = tokens[i + 1] if i + 1 < len(tokens) else (None, "")
            # `f(` is a call; `sum by (...) (` is an aggregation with its grouping first
            is_function = text.lower() not in _LABEL_LIST_KEYWORDS and (
                nxt == ("open", "(") or (nxt[0] == "ident" and nxt[1].lower() in ("by", "without")))
            if text.lower() not in _KEYWORDS and not is_function:
                names.add(text)
        i += 1
    if depth:
        raise ValueError(f"unclosed bracket in {expr}")
    return names


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> Iterator[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, rows' nested panels included."""
    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for p in panels:
            for t in p.get("targets", []):
                yield p["title"], t["expr"]
            yield from walk(p.get("panels", []))
    yield from walk(dashboard()["panels"])


def annotation_queries() -> Iterator[tuple[str, str]]:
    """(annotation name, expr) of the dashboard's Prometheus annotations."""
    for a in dashboard().get("annotations", {}).get("list", []):
        if "expr" in a:
            yield f"annotation {a['name']}", a["expr"]


def template_queries() -> Iterator[tuple[str, str]]:
    """The queries of the dashboard's variables, as PromQL (``label_values(expr, label)`` -> expr)."""
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q)
        assert m, f"variable {var['name']}: unexpected query {q!r}"
        yield f"variable {var['name']}", m.group(1)


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def substitute(expr: str) -> str:
    for k in sorted(GRAFANA_VARS, key=len, reverse=True):
        expr = expr.replace(k, GRAFANA_VARS[k])
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def exposed_names(families: Any) -> set[str]:
    """Sample names as they appear on /metrics (``_total``, ``_bucket``, ``_sum``, ...)."""
    return {s.name for fam in families for s in fam.samples}


def need_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"`{name}` not found: install Debian's `prometheus` package (apt-get install prometheus); "
                    ".ci/run does")
    return path


class FakeGpu:
    """A GPU probe with fixed readings, so the GPU series can be checked on CPU machines."""

    def read(self) -> Iterator[tuple[str, str, dict[str, str], float]]:
        labels = {"gpu": "GPU-fake"}
        for name, value in (("pfc_cuda_memory_allocated_bytes", 1.0e9), ("pfc_cuda_memory_reserved_bytes", 2.0e9),
                            ("pfc_cuda_memory_max_allocated_bytes", 1.5e9), ("pfc_gpu_utilization_ratio", 0.87),
                            ("pfc_gpu_memory_used_bytes", 3.0e9), ("pfc_gpu_memory_total_bytes", 8.0e10),
                            ("pfc_gpu_temperature_celsius", 61.0)):
            yield name, f"fake {name}", labels, value


STEP_SCALARS = {"loss": 12.5, "loss_softmax": 12.0, "loss_disc": 5.0, "grad_norm": 3.25, "finite": 1.0,
                "nonfinite_loss": 0.0, "nonfinite_grad": 0.0, "time_data_s": 0.01, "time_forward_s": 0.02,
                "time_backward_s": 0.03, "time_comm_s": 0.005, "time_optimizer_s": 0.004, "lr": 0.1,
                "xi_norm": 0.5}
DISCREPANCY = {"discrepancy_directional_deg": 60.0, "discrepancy_radial_cv": 0.25, "discrepancy_radial_std": 0.1,
               "discrepancy_directional_circvar": 0.4, "discrepancy_eps_norm_mean": 0.4,
               "discrepancy_xi_angle_deg": 120.0}
EVAL = {"lfw.bin": {"accuracy": 0.9, "accuracy_std": 0.02,
                    "tar_at_far": {"1e-4": None, "1e-3": 0.5, "1e-2": 0.75}, "threshold": 0.3}}


def fake_run(metrics: Any, steps: int = 3) -> None:
    """Every observe_* call the trainer makes, with a non-finite step among them."""
    for step in range(1, steps + 1):
        metrics.observe_step(step, STEP_SCALARS, images=16, sampled_classes=7, skipped_records=step - 1)
    bad = dict(STEP_SCALARS, loss=float("nan"), finite=0.0, nonfinite_loss=1.0)
    metrics.observe_step(steps + 1, bad, images=16, sampled_classes=7, skipped_records=steps)
    metrics.observe_discrepancy(DISCREPANCY)
    metrics.observe_eval(EVAL)
    metrics.observe_checkpoint(0.75)
