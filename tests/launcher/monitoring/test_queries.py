"""The deploy/ files: Prometheus config and rules pass promtool, every query names only emitted metrics."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from launcher.config import MetricsConfig
from launcher.monitoring.exporter import METRIC_NAMES, TrainingMetrics
from tests.launcher.monitoring.helpers import (
    DCGM_SERIES,
    GRAFANA_DIR,
    PROM_DIR,
    PROMETHEUS_BUILTIN,
    FakeGpu,
    alert_rules,
    annotation_queries,
    dashboard,
    dashboard_queries,
    exposed_names,
    fake_run,
    metric_names,
    need_binary,
    substitute,
    template_queries,
)


def test_metric_name_lexer():
    expr = ('avg by (phase) (rate(pfc_a_total{job=~"x", rank=~".*"}[5m:1m] offset 5m) / ignoring (phase) '
            'group_left rate(pfc_b_total[1h])) > 1e-3 or abs(pfc_c) == +Inf and on (job) '
            'histogram_quantile(0.9, sum by (le) (pfc_d_bucket{le!="{x}"}))')
    assert metric_names(expr) == {"pfc_a_total", "pfc_b_total", "pfc_c", "pfc_d_bucket"}
    assert metric_names("sum(up) by (job) < 2") == {"up"}
    with pytest.raises(ValueError, match="__name__"):
        metric_names('{__name__="pfc_a"}')
    with pytest.raises(ValueError, match="unclosed"):
        metric_names("rate(pfc_a[5m]")


def _emitted() -> set[str]:
    m = TrainingMetrics(MetricsConfig(enabled=True), rank=0, local_rank=0, node=0, world_size=2, device=FakeGpu())
    fake_run(m)
    m.close()  # the end mark (pfc_run_end_timestamp_seconds) is set when the run ends
    return exposed_names(m.registry.collect())


def _unknown(queries: list[tuple[str, str]], known: set[str]) -> list[tuple[str, str]]:
    return sorted({(where, n) for where, q in queries for n in metric_names(q) if n not in known})


def test_every_query_names_an_emitted_metric():
    emitted = _emitted()
    # the exporter's documented list and what it really emits agree (suffixes aside)
    families = {n.removesuffix("_total") for n in METRIC_NAMES}
    assert {n for n in emitted if not n.endswith(("_created", "_bucket", "_count", "_sum"))} \
        == {n for n in METRIC_NAMES if n != "pfc_step_duration_seconds"}
    assert all(any(e.startswith(f) for e in emitted) for f in families)

    known = emitted | PROMETHEUS_BUILTIN | DCGM_SERIES
    queries = [*dashboard_queries(), *template_queries(), *annotation_queries(),
               *((f"alert {r['alert']}", r["expr"]) for r in alert_rules())]
    assert len(queries) > 40
    assert not _unknown(queries, known), f"queries name metrics the exporter does not emit: {_unknown(queries, known)}"
    # the check itself can fail: a typo'd name and a counter without its suffix are caught
    assert _unknown([("typo", "rate(pfc_sample_total[5m])"), ("suffix", "pfc_steps")], known) \
        == [("suffix", "pfc_steps"), ("typo", "pfc_sample_total")]
    # every exporter family is shown or alerted on somewhere
    used = {n for _, q in queries for n in metric_names(q)}
    unused = {f for f in METRIC_NAMES
              if not any(u == f or u.startswith(f + "_") for u in used)} - {"pfc_last_eval_timestamp_seconds"}
    assert not unused, f"metrics on no dashboard panel or alert: {sorted(unused)}"


_COUNTER = re.compile(r"\b(pfc_\w+_total)\b")


def test_dashboard_is_per_run_reads_counters_through_rate_and_describes_every_panel():
    d = dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert {"run", "instance", "rank"} <= set(variables)
    assert "run" in variables["run"]["query"]["query"] and variables["run"]["includeAll"]
    panels = [p for p in d["panels"] if p["type"] != "row"]
    assert all(p.get("description") for p in d["panels"]), [p["title"] for p in d["panels"]
                                                            if not p.get("description")]
    for title, expr in dashboard_queries():
        if "DCGM_" in expr:  # GPU series of the hosts the selected run's ranks are on
            assert 'Hostname=~"$host"' in expr, (title, expr)
            continue
        names = metric_names(expr)
        assert all(f'{n}{{job=~"$job", run=~"$run", instance=~"$instance"' in expr for n in names), (title, expr)
        # every aggregation keeps runs apart
        for agg in re.findall(r"\b(?:sum|avg|max|min|count)\b(?: by \(([^)]*)\))?\s*\(", expr):
            assert "run" in agg.split(", "), (title, expr)
        # counters only through rate()/increase(): a torchrun restart resets them
        for counter in _COUNTER.findall(expr):
            assert re.search(rf"\b(?:rate|increase)\({counter}\{{", expr), (title, expr)
    # one unit per panel: no count on a seconds axis, no norm beside degrees
    for p in panels:
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit")
        exprs = [t["expr"] for t in p.get("targets", [])]
        if unit == "degree":
            assert all(e.startswith("deg(") for e in exprs), p["title"]
        if unit == "s":
            assert not any("_total" in e and "phase_seconds" not in e and "/" not in e for e in exprs), p["title"]
    # annotations mark checkpoints and restarts
    names = {a["name"]: a["expr"] for a in d["annotations"]["list"]}
    assert "pfc_checkpoints_total" in names["Checkpoints"] and "resets(pfc_steps_total" in names["Restarts"]


def test_dashboard_shape_and_provisioning():
    d = dashboard()
    titles = [p["title"] for p in d["panels"] if p["type"] != "row"]
    for needle in ("Throughput per rank", "Throughput, all ranks", "Loss by component", "Learning rate",
                   "Step time split", "Data wait", "memory per rank", "Directional discrepancy",
                   "Radial discrepancy", "xi norm", "Verification accuracy", "Checkpoint duration", "DCGM"):
        assert any(needle.lower() in t.lower() for t in titles), f"no panel for {needle!r}: {titles}"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    ds = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "pfc.yml").read_text())
    assert prov["providers"][0]["type"] == "file"


def _promtool(*args: str, cwd=PROM_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need_binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_promtool_check_config_and_rules():
    r = _promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "9 rules found" in r.stdout, r.stdout
    r = _promtool("check", "rules", "alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    r = _promtool("check", "config", "prometheus-kubernetes.yml")
    if r.returncode != 0 and "kubernetes_sd_configs not found" in r.stdout + r.stderr:
        # Debian's build leaves Kubernetes discovery out: check what it can (the YAML and the rest)
        k8s = yaml.safe_load((PROM_DIR / "prometheus-kubernetes.yml").read_text())
        job = k8s["scrape_configs"][0]
        assert job["job_name"].startswith("pfc") and job["kubernetes_sd_configs"] == [{"role": "pod"}]
        # the relabelling keeps exactly the per-rank port names of deploy/k8s/pytorchjob.yaml
        keep = next(r for r in job["relabel_configs"]
                    if r["source_labels"] == ["__meta_kubernetes_pod_container_port_name"])
        assert all(re.fullmatch(keep["regex"], n) for n in ("metrics", "metrics-1", "metrics-7"))
        assert not any(re.fullmatch(keep["regex"], n) for n in ("rdzv", "metrics-x", "http"))
    else:
        assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_rule_unit_tests_cover_every_alert_firing_and_not():
    tests = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())
    firing, quiet = set(), set()
    for t in tests["tests"]:
        for a in t["alert_rule_test"]:
            (firing if a["exp_alerts"] else quiet).add(a["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names <= firing, f"alerts never tested firing: {names - firing}"
    assert names <= quiet, f"alerts never tested not firing: {names - quiet}"
    r = _promtool("test", "rules", "alerts_test.yml")
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses each dashboard query (as a recording rule), Grafana variables substituted."""
    rules = [{"record": f"pfc_dashboard:query{i}", "expr": substitute(q)}
             for i, (_, q) in enumerate([*dashboard_queries(), *template_queries(), *annotation_queries()])]
    f = tmp_path / "dashboard_rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = _promtool("check", "rules", str(f), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(rules)} rules found" in r.stdout
