"""``metrics`` settings no other test set to another value: ``metrics.host`` is the address the exporter
binds (and only that one), ``metrics.job`` the Pushgateway job the pushes go to, which arrive every
``metrics.push_interval_s``."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from launcher.config import MetricsConfig
from launcher.monitoring.exporter import TrainingMetrics
from tests.launcher.monitoring.helpers import STEP_SCALARS, free_port


def test_the_default_host_is_loopback_outside_this_projects_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """127.0.0.1 by default; 0.0.0.0 in the images (docker/ sets PFC_CONTAINER=1: a published port reaches the
    container's interface, never its loopback); a given host wins either way; no recipe sets one (the
    deploy scripts do, for their jobs)."""
    from launcher.config import load_config
    from launcher.config_schema import CONTAINER_ENV

    monkeypatch.delenv(CONTAINER_ENV, raising=False)
    assert MetricsConfig().host == "127.0.0.1"
    assert load_config(None, []).metrics.host == "127.0.0.1"
    recipes = sorted((REPO / "launcher" / "configs").glob("*.yaml"))
    assert len(recipes) >= 5
    for recipe in recipes:
        assert "host" not in (yaml.safe_load(recipe.read_text()).get("metrics") or {}), recipe.name
    monkeypatch.setenv(CONTAINER_ENV, "1")
    assert load_config(None, []).metrics.host == "0.0.0.0"
    assert load_config(None, ["metrics.host=127.0.0.2"]).metrics.host == "127.0.0.2"


REPO = Path(__file__).resolve().parents[2]


def _exporter(**cfg: object) -> TrainingMetrics:
    return TrainingMetrics(MetricsConfig(enabled=True, **cfg), rank=1, local_rank=0, node=0, world_size=2,
                           run="exp-3")


def test_host_is_the_only_address_the_exporter_binds() -> None:
    """``metrics.host=127.0.0.2`` (another loopback address): /metrics answers there, and the same port on
    127.0.0.1 stays free (the default host, or a wildcard bind, would hold it)."""
    port = free_port()
    m = _exporter(host="127.0.0.2", port_base=port)
    m.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5) as r:
            assert b"pfc_world_size" in r.read()
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # raises EADDRINUSE if the exporter took 127.0.0.1 or 0.0.0.0
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", port))
    finally:
        m.close()


class _Gateway(BaseHTTPRequestHandler):
    """A Pushgateway stand-in that records (method, path, time) of every request."""

    seen: ClassVar[list[tuple[str, str, float]]] = []

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append(("PUT", self.path, time.monotonic()))
        self.send_response(200)
        self.end_headers()

    def do_DELETE(self) -> None:
        self.seen.append(("DELETE", self.path, time.monotonic()))
        self.send_response(202)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_job_names_the_pushed_group_and_pushes_come_every_interval() -> None:
    """``metrics.job=exp-job``, ``metrics.push_interval_s=0.25``: every push goes to
    /metrics/job/exp-job/..., one at once, about 4 a second, and a last one at the end (the default interval,
    15 s, would push only those two in 1.5 s)."""
    _Gateway.seen = []
    server = HTTPServer(("127.0.0.1", 0), _Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        m = _exporter(port_base=free_port(), pushgateway=f"http://127.0.0.1:{server.server_address[1]}",
                      push_interval_s=0.25, job="exp-job")
        m.start()
        t0 = time.monotonic()
        try:
            m.observe_step(1, STEP_SCALARS, images=8, sampled_classes=2, skipped_records=0)
            time.sleep(1.5)
        finally:
            m.close()
    finally:
        server.shutdown()
        server.server_close()
    puts = [(p, t - t0) for method, p, t in _Gateway.seen if method == "PUT"]
    assert {p for p, _ in puts} == {"/metrics/job/exp-job/node/0/rank/1/run/exp-3"}, puts
    assert 5 <= len(puts) <= 10, puts
    assert puts[0][1] < 0.2, puts  # the first push comes at once, not one interval later
    # the last push is the end's: the group is kept, with the run's final values
    assert _Gateway.seen[-1][:2] == ("PUT", "/metrics/job/exp-job/node/0/rank/1/run/exp-3")
