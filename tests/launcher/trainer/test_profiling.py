"""`pfc bench train --profile`: a torch.profiler record of the timed steps (launcher/trainer/profiling.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from launcher.trainer import profiling
from tests.support.pfc_forks import PfcForks


def test_no_profiler_unless_the_environment_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(profiling.DIR_ENV, raising=False)
    assert profiling.step_profiler(0, torch.device("cpu")) is None


@pytest.mark.parametrize("spec", ["", "3", "a:b", "0:2", "5:4"])
def test_a_bad_step_range_is_refused_naming_the_variable(spec: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(profiling.DIR_ENV, str(tmp_path))
    monkeypatch.setenv(profiling.STEPS_ENV, spec)
    with pytest.raises(ValueError, match=profiling.STEPS_ENV):
        profiling.step_profiler(0, torch.device("cpu"))


def _run_steps(prof: profiling.StepProfiler, steps: range) -> None:
    x = torch.ones(64, 64)
    for step in steps:
        prof.before(step)
        for _ in range(step):  # step k runs k matmuls
            x = x @ x.clamp(max=1.0) / 64
        prof.after(step)


def _mm_calls(text: str) -> int:
    rows = [line for line in text.splitlines() if line.split()[:1] == ["aten::mm"]]
    assert rows, text[:2000]
    return int(rows[0].split()[-1])


@pytest.mark.parametrize("steps, header, mm", [
    (range(1, 6), "steps 2..3 (times", 2 + 3),  # the whole range
    (range(3, 6), "steps 3..3 (times", 3),  # a resume that starts inside it
    (range(1, 3), "steps 2..2 (asked for 2..3: the run ended before)", 2),  # a run stopped before its end
])
def test_it_records_exactly_the_steps_it_ran(steps: range, header: str, mm: int, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(profiling.DIR_ENV, str(tmp_path))
    monkeypatch.setenv(profiling.STEPS_ENV, "2:3")
    prof = profiling.step_profiler(1, torch.device("cpu"))
    assert prof is not None
    _run_steps(prof, steps)
    prof.close()  # what the loop does after its last step
    text = (tmp_path / "profile_rank1.txt").read_text()
    assert f"rank 1, {header}" in text and "ms per step" in text
    assert _mm_calls(text) == mm
    assert json.loads((tmp_path / "trace_rank1.json").read_text())["traceEvents"]


def test_a_failing_run_stops_the_profiler_and_writes_nothing(tmp_path: Path) -> None:
    prof = profiling.StepProfiler(tmp_path, 1, 3, 0, torch.device("cpu"))
    _run_steps(prof, range(1, 2))
    prof.abandon()
    prof.close()
    assert not list(tmp_path.iterdir())


def test_device_busy_is_the_union_of_the_kernels_intervals() -> None:
    def ev(start: float, end: float, device: DeviceType = DeviceType.CUDA, note: bool = False) -> SimpleNamespace:
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), device_type=device,
                               is_user_annotation=note)

    events = [ev(0, 10), ev(5, 12),  # overlapping (two streams): 12, not 17
              ev(20, 25), ev(0, 100, DeviceType.CPU),  # a host event: not the device's
              ev(18, 40, note=True)]  # an optimizer's annotation row spans kernels already counted
    assert profiling.device_busy_us(events) == 12 + 5
    assert profiling.device_busy_us([]) == 0.0


def test_the_environment_asks_only_with_a_folder_and_is_restored(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(profiling.DIR_ENV, "/exported/by/the/shell")
    monkeypatch.delenv(profiling.STEPS_ENV, raising=False)
    with profiling.profile_environment(None, 2, 3):
        assert profiling.DIR_ENV not in os.environ  # no --profile: no profile, whatever the shell exported
    with profiling.profile_environment(tmp_path, 2, 3):
        assert os.environ[profiling.DIR_ENV] == str(tmp_path.resolve())
        assert os.environ[profiling.STEPS_ENV] == "2:3"
    assert os.environ[profiling.DIR_ENV] == "/exported/by/the/shell"
    assert profiling.STEPS_ENV not in os.environ


@pytest.mark.multiprocess
def test_bench_train_profiles_the_timed_steps_but_the_last(tmp_path: Path, pfc: PfcForks,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out, res_json = tmp_path / "prof", tmp_path / "r.json"
    r = pfc.run(["bench", "train", "--config", "demo_cpu", "--nproc", "1", "--steps", "3", "--warmup", "1",
                 "--device-data", "--profile", str(out), "--workdir", str(tmp_path / "work"),
                 "--json", str(res_json), "--set", "train.batch_size=8", "--set", "model.image_size=32"], timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    text = (out / "profile_rank0.txt").read_text()
    assert "rank 0, steps 2..3 (times" in text  # timed steps 2..4, the last one left out
    step_rows = [line for line in text.splitlines() if line.split()[:1] == ["Optimizer.step#SGD.step"]]
    assert step_rows and int(step_rows[0].split()[-1]) == 2, step_rows  # one backbone optimizer step per step
    assert json.loads(res_json.read_text())["profiled_steps"] == [2, 3]
    assert "profiles of steps 2-3" in r.stdout
