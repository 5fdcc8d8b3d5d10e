"""The exporter on its own: values, labels, units, absent-not-zero, ports, Pushgateway."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from typing import ClassVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from launcher.config import MetricsConfig
from launcher.monitoring import exporter as metrics_mod
from launcher.monitoring.exporter import MetricsPortError, TrainingMetrics
from tests.launcher.monitoring.helpers import DISCREPANCY, STEP_SCALARS, FakeGpu, fake_run, free_port


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _get(samples, name: str, **labels: str) -> float:
    hits = [v for (n, lab), v in samples.items() if n == name and set(labels.items()) <= set(lab)]
    assert len(hits) == 1, f"{name}{labels}: {len(hits)} samples"
    return hits[0]


def _exporter(port: int, cfg: dict | None = None, **kw) -> TrainingMetrics:
    return TrainingMetrics(MetricsConfig(enabled=True, port_base=port, **(cfg or {})), rank=kw.pop("rank", 3),
                           local_rank=kw.pop("local_rank", 1), node=kw.pop("node", 1), world_size=4, **kw)


def test_served_values_labels_and_units():
    base = free_port(2)
    m = _exporter(base, device=FakeGpu())
    m.start()
    try:
        assert m.port == base + 1  # port base + local rank
        fake_run(m, steps=3)
        s = _scrape(base + 1)
    finally:
        m.close()
    for (name, labels), _ in s.items():
        assert name.startswith("pfc_"), name
        assert dict(labels)["rank"] == "3" and dict(labels)["node"] == "1", (name, labels)
    assert _get(s, "pfc_world_size") == 4
    assert _get(s, "pfc_steps_total") == 4 and _get(s, "pfc_samples_total") == 4 * 16
    assert _get(s, "pfc_training_step") == 4
    assert _get(s, "pfc_step_duration_seconds_count") == 4
    for key, phase in (("time_data_s", "data"), ("time_forward_s", "forward"), ("time_backward_s", "backward"),
                       ("time_comm_s", "communication"), ("time_optimizer_s", "optimizer")):
        assert _get(s, "pfc_step_phase_seconds_total", phase=phase) == pytest.approx(4 * STEP_SCALARS[key],
                                                                                      rel=1e-12)
    assert math.isnan(_get(s, "pfc_loss", component="total"))  # the last step's loss was NaN
    assert _get(s, "pfc_loss", component="softmax") == 12.0 and _get(s, "pfc_loss", component="discface") == 5.0
    assert _get(s, "pfc_step_finite") == 0.0
    assert _get(s, "pfc_nonfinite_steps_total", cause="loss") == 1
    assert _get(s, "pfc_nonfinite_steps_total", cause="gradient") == 0
    assert _get(s, "pfc_data_skipped_records_total") == 3  # running total 0,1,2,3 -> counter 3
    assert _get(s, "pfc_learning_rate") == 0.1 and _get(s, "pfc_grad_norm") == 3.25
    assert _get(s, "pfc_head_sampled_classes") == 7 and _get(s, "pfc_discface_xi_norm") == 0.5
    assert _get(s, "pfc_discrepancy_directional_radians") == pytest.approx(
        math.radians(DISCREPANCY["discrepancy_directional_deg"]), rel=1e-15)
    assert _get(s, "pfc_discrepancy_xi_angle_radians") == pytest.approx(math.radians(120.0), rel=1e-15)
    assert _get(s, "pfc_discrepancy_radial_cv") == 0.25
    assert _get(s, "pfc_discrepancy_directional_circular_variance") == 0.4
    assert _get(s, "pfc_verification_accuracy", dataset="lfw") == 0.9
    assert _get(s, "pfc_verification_accuracy_std", dataset="lfw") == 0.02
    assert _get(s, "pfc_verification_tar", dataset="lfw", far="1e-2") == 0.75
    assert not [k for k in s if k[0] == "pfc_verification_tar" and ("far", "1e-4") in k[1]]  # None: absent
    assert _get(s, "pfc_checkpoint_duration_seconds") == 0.75 and _get(s, "pfc_checkpoints_total") == 1
    assert _get(s, "pfc_gpu_temperature_celsius", gpu="GPU-fake") == 61.0
    assert _get(s, "pfc_gpu_utilization_ratio") == 0.87
    assert _get(s, "pfc_memory_rss_bytes") > 10e6


def test_a_loss_scale_backoff_is_not_a_nonfinite_step():
    """An fp16 loss-scale back-off skips the step but is no fault: the non-finite counter (and its alert)
    stays at 0; a real non-finite gradient still counts."""
    base = free_port(2)
    m = _exporter(base)
    m.start()
    try:
        backoff = dict(STEP_SCALARS, finite=0.0, nonfinite_grad=1.0, scale_backoff=1.0)
        m.observe_step(1, backoff, images=16, sampled_classes=7, skipped_records=0)
        s = _scrape(base + 1)
        assert _get(s, "pfc_nonfinite_steps_total", cause="gradient") == 0 and _get(s, "pfc_step_finite") == 1.0
        m.observe_step(2, dict(backoff, scale_backoff=0.0), images=16, sampled_classes=7, skipped_records=0)
        s = _scrape(base + 1)
        assert _get(s, "pfc_nonfinite_steps_total", cause="gradient") == 1 and _get(s, "pfc_step_finite") == 0.0
    finally:
        m.close()


def test_absent_until_measured_and_no_gpu_series_on_cpu():
    base = free_port()
    m = _exporter(base, local_rank=0)
    m.start()
    try:
        s = _scrape(base)
        names = {n for n, _ in s}
        assert _get(s, "pfc_steps_total") == 0  # counters start at 0 so rate() sees the first step
        for absent in ("pfc_loss", "pfc_learning_rate", "pfc_discrepancy_directional_radians",
                       "pfc_verification_accuracy", "pfc_checkpoint_duration_seconds",
                       "pfc_last_step_timestamp_seconds"):
            assert absent not in names, absent
        assert not [n for n in names if n.startswith(("pfc_cuda_", "pfc_gpu_"))]
        # DiscFace off: no loss_disc and xi_norm 0.0 from the trainer -> no xi series at all
        off = {k: v for k, v in STEP_SCALARS.items() if k != "loss_disc"} | {"xi_norm": 0.0}
        m.observe_step(1, off, images=8, sampled_classes=3, skipped_records=0)
        s = _scrape(base)
        assert ("pfc_discface_xi_norm" not in {n for n, _ in s})
        assert not [k for k in s if k[0] == "pfc_loss" and ("component", "discface") in k[1]]
    finally:
        m.close()


def test_step_time_excludes_evaluation_and_checkpoint(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(metrics_mod.time, "perf_counter", lambda: clock[0])
    m = TrainingMetrics(MetricsConfig(enabled=True), rank=0, local_rank=0, node=0, world_size=1)
    clock[0] += 2.0
    m.observe_step(1, STEP_SCALARS, images=1, sampled_classes=1, skipped_records=0)
    clock[0] += 30.0  # evaluation
    m.observe_eval({"lfw.bin": {"accuracy": 0.5, "accuracy_std": 0.1, "tar_at_far": {}}})
    clock[0] += 0.25
    m.observe_step(2, STEP_SCALARS, images=1, sampled_classes=1, skipped_records=0)
    clock[0] += 10.0  # checkpoint
    m.observe_checkpoint(10.0)
    clock[0] += 0.5
    m.observe_step(3, STEP_SCALARS, images=1, sampled_classes=1, skipped_records=0)
    samples = {(s.name, s.labels.get("le")): s.value for f in m.registry.collect() for s in f.samples}
    assert samples[("pfc_step_duration_seconds_sum", None)] == pytest.approx(2.75, rel=1e-12)
    assert samples[("pfc_step_last_duration_seconds", None)] == pytest.approx(0.5, rel=1e-12)
    assert samples[("pfc_step_duration_seconds_bucket", "1.0")] == 2


def test_disabled_binds_nothing_and_exports_nothing():
    base = free_port()
    m = TrainingMetrics(MetricsConfig(enabled=False, port_base=base), rank=0, local_rank=0, node=0, world_size=1)
    m.start()
    fake_run(m)
    with socket.socket() as s:
        s.bind(("127.0.0.1", base))  # still free
    assert list(m.registry.collect()) == []
    m.close()


def test_taken_port_is_a_clear_error_and_next_free_is_explicit(monkeypatch, caplog):
    base = free_port(3)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", base))
        blocker.listen()
        m = _exporter(base, local_rank=0)
        with pytest.raises(MetricsPortError, match=rf"127\.0\.0\.1:{base}\b.*metrics\.port_policy"):
            m.start()
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        m = _exporter(base, {"port_policy": "next-free"}, local_rank=0)
        with caplog.at_level(logging.WARNING, logger="pfc"):
            m.start()
        try:
            assert m.port == base + 2  # stride of the local world: never a neighbour's first choice
            assert f"127.0.0.1:{base} is taken" in caplog.text
            assert _get(_scrape(base + 2), "pfc_world_size") == 4
        finally:
            m.close()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the scrape's TIME_WAIT is not a listener
        s.bind(("127.0.0.1", base + 2))  # close() released the port
    with pytest.raises(ValueError, match="port_policy"):
        _exporter(base, {"port_policy": "random"}).start()


class _Gateway(BaseHTTPRequestHandler):
    """A Pushgateway stand-in: records (method, path, body, monotonic time) of every request."""

    received: ClassVar[list[tuple[str, str, bytes, float]]] = []

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append(("PUT", self.path, body, time.monotonic()))
        self.send_response(200)
        self.end_headers()

    def do_DELETE(self) -> None:
        self.received.append(("DELETE", self.path, b"", time.monotonic()))
        self.send_response(202)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _gateway() -> Iterator[tuple[str, list[tuple[str, str, bytes, float]]]]:
    _Gateway.received = []
    server = HTTPServer(("127.0.0.1", 0), _Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Gateway.received
    finally:
        server.shutdown()
        server.server_close()


def _pushed(body: bytes) -> dict[str, float]:
    return {s.name: s.value for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def test_a_job_shorter_than_the_push_interval_is_pushed_at_start_and_at_its_end():
    """push_interval_s 30 s, a run of one step that closes at once: a first push right after start (before
    any interval), a last push from close() with the final values and the end mark, and no DELETE: the
    group stays with the run's last values."""
    with _gateway() as (url, received):
        m = _exporter(free_port(2), {"pushgateway": url, "push_interval_s": 30, "run_id": "exp-7"})
        t0 = time.monotonic()
        m.start()
        deadline = t0 + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.02)
        assert received, "no push right after start"
        first = received[0]
        m.observe_step(1, STEP_SCALARS, images=16, sampled_classes=2, skipped_records=0)
        before_close = time.time()
        m.close()
        m.close()  # a second close pushes nothing more
        got = list(received)
    assert [r[:2] for r in got] == [("PUT", "/metrics/job/pfc/node/1/rank/3/run/exp-7")] * 2, got
    assert first[3] - t0 < 5  # the first push did not wait an interval (30 s)
    start_values, end_values = _pushed(got[0][2]), _pushed(got[-1][2])
    assert start_values["pfc_world_size"] == 4 and "pfc_run_end_timestamp_seconds" not in start_values
    assert start_values["pfc_samples_total"] == 0
    assert end_values["pfc_samples_total"] == 16 and end_values["pfc_training_step"] == 1
    ended = end_values["pfc_run_end_timestamp_seconds"]
    assert before_close <= ended <= time.time()
    assert ended >= end_values["pfc_last_step_timestamp_seconds"]


class _SlowFirstGateway(_Gateway):
    """A slow gateway: its first PUT is applied (recorded) 2 s after it came, then answered; the others at once."""

    first_seen = threading.Event()

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if not self.first_seen.is_set():
            self.first_seen.set()
            time.sleep(2.0)
        self.received.append(("PUT", self.path, body, time.monotonic()))
        self.send_response(200)
        self.end_headers()


def test_the_last_push_follows_a_push_in_flight(monkeypatch):
    """close() gives up waiting for the push thread (here after 0.3 s instead of 10) while its push is still
    unanswered: its own last push, with the end mark, must still be applied after that one, or the group would
    keep values without the end mark (PfcStepHung for a rank that ended)."""
    import launcher.monitoring.exporter as exporter

    monkeypatch.setattr(exporter, "PUSH_JOIN_S", 0.3)
    _SlowFirstGateway.received = []
    _SlowFirstGateway.first_seen = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowFirstGateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        m = _exporter(free_port(2), {"pushgateway": f"http://127.0.0.1:{server.server_address[1]}",
                                     "push_interval_s": 30, "run_id": "exp-8"})
        m.start()
        deadline = time.monotonic() + 10
        while not _SlowFirstGateway.first_seen.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        m.close()
        deadline = time.monotonic() + 5
        while len(_SlowFirstGateway.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        got = list(_SlowFirstGateway.received)
    finally:
        server.shutdown()
        server.server_close()
    assert len(got) == 2, got
    assert "pfc_run_end_timestamp_seconds" not in _pushed(got[0][2])
    assert "pfc_run_end_timestamp_seconds" in _pushed(got[-1][2])  # applied last


def test_pushes_come_every_interval_and_a_gateway_that_is_down_never_stops_training(caplog):
    with _gateway() as (url, received):
        m = _exporter(free_port(2), {"pushgateway": url, "push_interval_s": 0.2, "run_id": "exp-7"})
        m.start()
        m.observe_step(1, STEP_SCALARS, images=16, sampled_classes=2, skipped_records=0)
        deadline = time.monotonic() + 10
        while len(received) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        m.close()
    assert len(received) >= 4 and {r[0] for r in received} == {"PUT"}
    assert b'pfc_samples_total{node="1",rank="3",run="exp-7"} 16.0' in received[-1][2]
    # a gateway that is down: logged (the first push and the last), not raised
    m = _exporter(free_port(2), {"pushgateway": f"http://127.0.0.1:{free_port()}"})
    m.start()
    with caplog.at_level(logging.WARNING, logger="pfc"):
        m.close()
    assert "push to http://127.0.0.1" in caplog.text and "failed" in caplog.text


def test_cuda_reading_uses_the_devices_uuid_and_base_units(monkeypatch):
    """The GPU probe against stand-ins for torch.cuda and nvidia-ml-py (no GPU on CI)."""
    import sys
    import types

    import torch

    from launcher.monitoring.exporter import CudaReading

    calls: list[str] = []
    nvml = types.ModuleType("pynvml")
    nvml.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
    nvml.nvmlInit = lambda: calls.append("init")  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByUUID = lambda uuid: calls.append(uuid) or "handle"  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=87, memory=40)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=3 << 30, total=80 << 30)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetTemperature = lambda h, sensor: 64  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid="1234-abcd"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: 100 + i)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 200 + i)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i: 300 + i)

    m = TrainingMetrics(MetricsConfig(enabled=True), rank=5, local_rank=1, node=0, world_size=8,
                        device=CudaReading(1))
    s = {(x.name, x.labels["gpu"]): x.value for f in m.registry.collect() for x in f.samples if "gpu" in x.labels}
    assert calls == ["init", "GPU-1234-abcd"]
    assert s == {("pfc_cuda_memory_allocated_bytes", "GPU-1234-abcd"): 101.0,
                 ("pfc_cuda_memory_reserved_bytes", "GPU-1234-abcd"): 201.0,
                 ("pfc_cuda_memory_max_allocated_bytes", "GPU-1234-abcd"): 301.0,
                 ("pfc_gpu_utilization_ratio", "GPU-1234-abcd"): 0.87,
                 ("pfc_gpu_memory_used_bytes", "GPU-1234-abcd"): float(3 << 30),
                 ("pfc_gpu_memory_total_bytes", "GPU-1234-abcd"): float(80 << 30),
                 ("pfc_gpu_temperature_celsius", "GPU-1234-abcd"): 64.0}
    # NVML failing at read time drops the NVML series, keeps the allocator ones and the scrape
    def broken(h):
        raise RuntimeError("GPU fell off the bus")
    nvml.nvmlDeviceGetUtilizationRates = broken  # type: ignore[attr-defined]
    names = {x.name for f in m.registry.collect() for x in f.samples}
    assert "pfc_cuda_memory_allocated_bytes" in names and "pfc_gpu_utilization_ratio" not in names
    assert "pfc_steps_total" in names


def test_run_identity_labels_every_series_and_is_written_to_the_run_folder(monkeypatch, tmp_path):
    from launcher.monitoring.exporter import resolve_run_id

    for k in ("SLURM_JOB_ID", "PFC_RUN_ID", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    cfg = MetricsConfig(enabled=True)
    generated = resolve_run_id(cfg, tmp_path / "a", write=True)
    assert (tmp_path / "a" / "run_id").read_text().strip() == generated != resolve_run_id(cfg)
    # every rank of one launch derives the same id from the rendezvous address and the run folder
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert resolve_run_id(cfg, tmp_path) == resolve_run_id(cfg, tmp_path) != resolve_run_id(cfg, tmp_path / "b")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's placeholder is not an identity
    assert resolve_run_id(cfg, tmp_path) == resolve_run_id(cfg, tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "rdzv-3")
    assert resolve_run_id(cfg) == "rdzv-3"
    monkeypatch.setenv("PFC_RUN_ID", "pytorchjob-x")
    assert resolve_run_id(cfg) == "pytorchjob-x"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert resolve_run_id(cfg) == "slurm-4242"
    assert resolve_run_id(MetricsConfig(run_id="exp-1")) == "exp-1"  # the config wins
    with pytest.raises(ValueError, match="run_id"):
        MetricsConfig(run_id="two words")

    base = free_port(2)
    m = _exporter(base, {"run_id": "exp-1"})
    m.start()
    try:
        fake_run(m, steps=2)
        s = _scrape(base + 1)
    finally:
        m.close()
    assert s and all(dict(labels).get("run") == "exp-1" for (_, labels) in s), sorted(s)[:3]


def test_a_resume_started_here_keeps_the_run_label_and_a_fresh_start_does_not(monkeypatch, tmp_path):
    from launcher.commands.train import kept_run_label
    from launcher.config import load_config
    from launcher.monitoring.exporter import kept_run_id

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("PFC_RUN_ID", "")  # empty, as unset; the test's end puts the environment back
    cfg = load_config(None, [f"output={json.dumps(str(tmp_path))}"])
    (tmp_path / "run_id").write_text("3f2a-first-launch\n")
    with kept_run_label(cfg, elsewhere=False):  # the folder has no checkpoint: a fresh start, a new id
        assert not os.environ["PFC_RUN_ID"]
    save = tmp_path / "checkpoints" / "step_00000002"
    save.mkdir(parents=True)
    (save / "meta.json").write_text("{}")
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002\n")
    with kept_run_label(cfg, elsewhere=True):  # a rendezvous id of the user's (torchrun by hand, multi-node)
        assert not os.environ["PFC_RUN_ID"]
    with kept_run_label(cfg, elsewhere=False):
        assert os.environ["PFC_RUN_ID"] == "3f2a-first-launch"
    assert os.environ["PFC_RUN_ID"] == ""  # put back: `pfc train` inside another process leaves no id behind
    for text in ("two words", "x" * 129, "../../etc"):  # a file's text that is no label value is not kept
        (tmp_path / "run_id").write_text(text)
        assert kept_run_id(tmp_path) is None, text


def test_a_port_past_65535_says_so() -> None:
    """port_base + local_rank beyond the last port: the error says why (it used to read ": None")."""
    m = _exporter(65535, local_rank=1)
    with pytest.raises(MetricsPortError, match=r":65536: port 65536 is past 65535 \(metrics\.port_base 65535"):
        m.start()
    m.close()
