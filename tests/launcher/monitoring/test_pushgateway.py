"""A pushed run as Prometheus sees it: the Pushgateway scrape job of deploy/prometheus/prometheus.yml keeps the
pushed labels, and the dashboard lets a rank that ended (its last push carries
``pfc_run_end_timestamp_seconds``) drop out of "Seconds since last step" while a killed rank grows there.
The alert rules' finished case is in deploy/prometheus/alerts_test.yml."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from tests.launcher.monitoring.helpers import PROM_DIR, dashboard_queries, need_binary, substitute


def test_prometheus_yml_scrapes_a_pushgateway_keeping_the_pushed_labels():
    """honor_labels keeps the pushed ``job`` (``pfc``, which the alerts select) and ``run``/``node``/``rank``;
    the scrape job is not named pfc*, so the gateway's own ``up`` never reads as a rank (PfcRankDown)."""
    jobs = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())["scrape_configs"]
    gateways = [j for j in jobs if any(t.endswith(":9091") for sc in j.get("static_configs", [])
                                       for t in sc["targets"])]
    assert len(gateways) == 1, [j["job_name"] for j in jobs]
    (gw,) = gateways
    assert gw.get("honor_labels") is True
    patterns = set(re.findall(r'job=~"([^"]+)"', (PROM_DIR / "alerts.yml").read_text()))
    assert patterns and not any(re.fullmatch(p, gw["job_name"]) for p in patterns), gw["job_name"]
    assert all(re.fullmatch(p, "pfc") for p in patterns)  # metrics.job's default, which honor_labels keeps


def test_seconds_since_last_step_leaves_out_a_rank_that_ended(tmp_path: Path):
    """promtool evaluates the panel's query at 30m on a pushed run: rank 0 ended at 10m (end mark), rank 1
    was killed at 10m (none). Only rank 1 shows, 20 minutes since its last step."""
    (expr,) = [q for title, q in dashboard_queries() if title == "Seconds since last step"]
    sel = 'run="p1", job="pfc", node="0"'
    rules = tmp_path / "none.yml"
    rules.write_text("groups: []\n")
    test = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": f'pfc_last_step_timestamp_seconds{{{sel}, rank="0"}}', "values": "0+60x10 600x20"},
                {"series": f'pfc_last_step_timestamp_seconds{{{sel}, rank="1"}}', "values": "0+60x10 600x20"},
                {"series": f'pfc_run_end_timestamp_seconds{{{sel}, rank="0"}}', "values": "_x10 601x20"},
            ],
            "promql_expr_test": [{
                "expr": substitute(expr),
                "eval_time": "30m",
                "exp_samples": [{"labels": f'{{{sel}, rank="1"}}', "value": 1200}],
            }],
        }],
    }
    f = tmp_path / "panel_test.yml"
    f.write_text(yaml.safe_dump(test))
    r = subprocess.run([need_binary("promtool"), "test", "rules", str(f)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
