"""The dashboard's GPU (dcgm-exporter) panels select the GPUs of the nodes the selected run is on, with
the labels deploy/prometheus's scrape configs give the ranks' and dcgm-exporter's targets: under the
static / file-based config (bare metal, SLURM) and under Kubernetes pod discovery (and the PodMonitor).

The labels a target gets are what Prometheus' relabelling makes of its discovered labels. For the static
and file-based jobs the real Prometheus computes them (its targets API, no scrape needed); Kubernetes
discovery needs a cluster, so its discovered labels are written here after the pods of
deploy/k8s/pytorchjob.yaml and a GPU Operator dcgm-exporter, and relabelled by :func:`relabel`, which
the first test checks against the real Prometheus on the same rules.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.guide import REPO, free_port, tool

PROM = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "pfc-training.json"
EXPORTER_LABELS = {"rank", "node", "run"}  # set by pfc's exporter on every series, not by the scrape


def _setting(rule: dict[str, Any], key: str, default: Any = None) -> Any:
    """A relabel rule's setting, by Prometheus' name (source_labels) or the Operator's (sourceLabels)."""
    return rule.get(key, rule.get(re.sub(r"_(\w)", lambda c: c[1].upper(), key), default))


def _expand(replacement: str, match: re.Match[str]) -> str:
    return re.sub(r"\$\{?(\d+)\}?", lambda g: match.group(int(g[1])) or "", replacement)


def relabel(labels: dict[str, str], rules: list[dict[str, Any]], job: str) -> dict[str, str] | None:
    """Prometheus' target relabelling (replace, keep, drop) of discovered ``labels``; None: dropped. As
    Prometheus: ``job`` and ``instance`` (= ``__address__``) filled in, ``__``-labels removed."""
    out = {"job": job, **labels}
    for rule in rules:
        value = _setting(rule, "separator", ";").join(out.get(s, "") for s in _setting(rule, "source_labels", []))
        m = re.fullmatch(_setting(rule, "regex", "(.*)"), value)
        action = _setting(rule, "action", "replace")
        if (action == "keep" and not m) or (action == "drop" and m):
            return None
        if action == "replace" and m:
            new = _expand(_setting(rule, "replacement", "$1"), m)
            target = _setting(rule, "target_label")
            if new:
                out[target] = new
            else:
                out.pop(target, None)
    out.setdefault("instance", out["__address__"])
    return {k: v for k, v in out.items() if not k.startswith("__")}


def _jobs(config: Path) -> dict[str, dict[str, Any]]:
    return {j["job_name"]: j for j in yaml.safe_load(config.read_text())["scrape_configs"]}


def _variable(name: str) -> dict[str, Any]:
    return next(v for v in json.loads(DASHBOARD.read_text())["templating"]["list"] if v["name"] == name)


def _dcgm_selectors() -> Iterator[tuple[str, dict[str, str]]]:
    """(panel title, {label: value}) of every DCGM_* selector of the dashboard's panels."""
    for p in json.loads(DASHBOARD.read_text())["panels"]:
        for t in p.get("targets", []):
            for body in re.findall(r"DCGM_\w+\{([^}]*)\}", t.get("expr", "")):
                yield p["title"], dict(re.findall(r'(\w+)\s*=~?\s*"([^"]*)"', body))


def _host_values(pfc_targets: list[dict[str, str]]) -> set[str]:
    """What the dashboard's $host variable lists for these ranks' targets (its label_values and regex)."""
    var = _variable("host")
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"]["query"])
    assert m, var["query"]
    label = m.group(2)
    assert all(label in t or label in EXPORTER_LABELS for t in pfc_targets), (
        f"$host reads `{label}`, which the ranks' targets do not have: {pfc_targets[0]}")
    values = {t.get(label, "") for t in pfc_targets}
    if var.get("regex"):
        values = {mm.group(1) for v in values if (mm := re.match(var["regex"].strip("/"), v))}
    return values


def assert_gpu_panels_select_the_run_hosts(pfc_targets: list[dict[str, str]], dcgm_targets: list[dict[str, str]],
                                           run_gpus: set[str]) -> None:
    """Every DCGM panel, with $host as the dashboard computes it from the ranks' targets, selects exactly
    the dcgm-exporter targets in ``run_gpus`` (their ``instance``), by a label every dcgm target has."""
    var = _variable("host")
    # "All" must be the hosts listed, not a wildcard over every node's GPUs
    assert var.get("allValue") in (None, ""), f"$host's All is {var['allValue']!r}: every GPU of the cluster"
    hosts = _host_values(pfc_targets)
    for title, matchers in _dcgm_selectors():
        for label, value in matchers.items():
            if value != "$host":
                continue
            missing = [t["instance"] for t in dcgm_targets if label not in t]
            assert not missing, f"{title}: dcgm-exporter targets {missing} have no `{label}` label"
            picked = {t["instance"] for t in dcgm_targets if t[label] in hosts}
            assert picked == run_gpus, f"{title}: {label}=~$host ({sorted(hosts)}) selects {picked}, not {run_gpus}"


# ---- static and file-based discovery (bare metal, SLURM) -----------------------------------------------

@pytest.fixture(scope="module")
def prometheus_targets(tmp_path_factory) -> dict[str, list[dict[str, str]]]:
    """{job: the labels of each of its targets}, from the real Prometheus run on prometheus.yml with a
    SLURM targets file (train.sbatch's format) on node03 and node04."""
    binary = tool("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian package prometheus)")
    tmp = tmp_path_factory.mktemp("prom")
    (tmp / "targets").mkdir()
    (tmp / "targets" / "pfc-42.json").write_text(json.dumps(
        [{"targets": ["node03:9400", "node03:9401", "node04:9400", "node04:9401"], "labels": {"cluster": "slurm"}}]))
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    cfg["rule_files"] = [str(PROM / r) for r in cfg["rule_files"]]
    (dcgm,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "dcgm-exporter"]
    dcgm["static_configs"][0]["targets"] += ["node03:9500", "node04:9500", "node05:9500"]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    with open(tmp / "log", "wb") as log:
        proc = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'db'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp / "log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=2) as r:
                    active = json.loads(r.read())["data"]["activeTargets"]
                if {t["labels"]["job"] for t in active} >= {"pfc", "pfc-file-sd", "dcgm-exporter"}:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError(f"prometheus listed no targets in 30 s: {(tmp / 'log').read_text()[-2000:]}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    jobs: dict[str, list[dict[str, str]]] = {}
    for t in active:
        jobs.setdefault(t["labels"]["job"], []).append(t["labels"])
        # the relabelling below for Kubernetes is Prometheus' own, on these rules
        rules = _jobs(tmp / "prometheus.yml")[t["labels"]["job"]].get("relabel_configs", [])
        assert relabel(t["discoveredLabels"], rules, t["labels"]["job"]) == t["labels"], t
    return jobs


@pytest.mark.parametrize("job, hosts", [("pfc", ["node01", "node02"]), ("pfc-file-sd", ["node03", "node04"])])
def test_gpu_panels_select_the_run_hosts_gpus_under_static_and_slurm_discovery(prometheus_targets, job, hosts):
    dcgm = prometheus_targets["dcgm-exporter"]
    assert_gpu_panels_select_the_run_hosts(prometheus_targets[job], dcgm, {f"{h}:9500" for h in hosts})


# ---- Kubernetes pod discovery ---------------------------------------------------------------------------

def _pod_targets(labels: dict[str, str], annotations: dict[str, str], ports: dict[str, int], ip: str,
                 node: str) -> list[dict[str, str]]:
    """What pod discovery yields for a running pod: one target per container port."""
    def san(k: str) -> str:
        return re.sub(r"[^a-zA-Z0-9_]", "_", k)

    meta = {"__meta_kubernetes_namespace": "default", "__meta_kubernetes_pod_name": f"pod-{ip}",
            "__meta_kubernetes_pod_phase": "Running", "__meta_kubernetes_pod_node_name": node,
            "__meta_kubernetes_pod_ip": ip,
            **{f"__meta_kubernetes_pod_label_{san(k)}": v for k, v in labels.items()},
            **{f"__meta_kubernetes_pod_annotation_{san(k)}": v for k, v in annotations.items()}}
    return [dict(meta, __address__=f"{ip}:{p}", __meta_kubernetes_pod_container_port_name=n) for n, p in ports.items()]


def _k8s_pods() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Discovered targets: the job's two worker pods (gpu-a, gpu-b) and dcgm-exporter on gpu-a, gpu-b, gpu-c."""
    (job,) = yaml.safe_load_all((REPO / "deploy" / "k8s" / "pytorchjob.yaml").read_text())
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    labels = dict(pod["metadata"]["labels"], **{"training.kubeflow.org/job-name": "pfc-train"})
    pfc = [t for i, node in enumerate(["gpu-a", "gpu-b"])
           for t in _pod_targets(labels, pod["metadata"]["annotations"], ports, f"10.0.0.{i + 1}", node)]
    dcgm = [t for i, node in enumerate(["gpu-a", "gpu-b", "gpu-c"])
            for t in _pod_targets({"app": "nvidia-dcgm-exporter"}, {}, {"metrics": 9400}, f"10.0.9.{i + 1}", node)]
    return pfc, dcgm


def _relabelled(targets: list[dict[str, str]], job: dict[str, Any]) -> list[dict[str, str]]:
    out = [relabel(t, job.get("relabel_configs", []), job["job_name"]) for t in targets]
    return [t for t in out if t is not None]


def test_gpu_panels_select_the_run_hosts_gpus_under_kubernetes_pod_discovery():
    jobs = _jobs(PROM / "prometheus-kubernetes.yml")
    pfc, dcgm = _k8s_pods()
    ranks = _relabelled(pfc, jobs["pfc-kubernetes"])
    assert len(ranks) == 16, "pod discovery keeps one target per local rank of both pods"
    gpus = _relabelled(dcgm, jobs["dcgm-exporter"])
    assert_gpu_panels_select_the_run_hosts(ranks, gpus, {"10.0.9.1:9400", "10.0.9.2:9400"})


def test_podmonitor_labels_the_ranks_with_their_node_as_pod_discovery_does():
    """Under the Prometheus Operator each PodMonitor endpoint's relabelings give the ranks the label the
    GPU panels join on (dcgm-exporter's ServiceMonitor needs the same one: docs/deploy.md)."""
    (pm,) = yaml.safe_load_all((REPO / "deploy" / "k8s" / "podmonitor.yaml").read_text())
    pfc, dcgm = _k8s_pods()
    ranks = [relabel(t, ep.get("relabelings", []), "default/pfc-train") for ep in pm["spec"]["podMetricsEndpoints"]
             for t in pfc if t["__meta_kubernetes_pod_container_port_name"] == ep["port"]]
    assert None not in ranks and len(ranks) == 16, "the PodMonitor scrapes every local rank of both pods"
    gpus = _relabelled(dcgm, _jobs(PROM / "prometheus-kubernetes.yml")["dcgm-exporter"])
    run_gpus = {"10.0.9.1:9400", "10.0.9.2:9400"}
    assert_gpu_panels_select_the_run_hosts([t for t in ranks if t is not None], gpus, run_gpus)


def test_podmonitor_ranks_are_in_the_job_the_alerts_and_the_dashboard_select():
    """The Operator names a PodMonitor's job ``<namespace>/<name>``, which no ``job=~"pfc.*"`` of the alert
    rules matches: a rank down under the Operator would never alert. The endpoints rename it."""
    (pm,) = yaml.safe_load_all((REPO / "deploy" / "k8s" / "podmonitor.yaml").read_text())
    pfc, _ = _k8s_pods()
    jobs = {relabel(t, ep.get("relabelings", []), "default/pfc-train")["job"]  # type: ignore[index]
            for ep in pm["spec"]["podMetricsEndpoints"] for t in pfc
            if t["__meta_kubernetes_pod_container_port_name"] == ep["port"]}
    patterns = set(re.findall(r'job=~"([^"]+)"', (PROM / "alerts.yml").read_text()))
    assert patterns, "the alert rules select their jobs by job=~"
    assert jobs == {"pfc-kubernetes"} and all(re.fullmatch(p, j) for p in patterns for j in jobs), (jobs, patterns)
