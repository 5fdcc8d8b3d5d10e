"""`pfc bench train --profile`: a torch.profiler record of the timed steps (launcher/trainer/profiling.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.trainer import profiling


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


def test_it_records_exactly_the_steps_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(profiling.DIR_ENV, str(tmp_path))
    monkeypatch.setenv(profiling.STEPS_ENV, "2:3")
    prof = profiling.step_profiler(1, torch.device("cpu"))
    assert prof is not None
    x = torch.ones(64, 64)
    for step in range(1, 6):
        prof.before(step)
        for _ in range(step):  # step k runs k matmuls: 2 + 3 = 5 in the record
            x = x @ x.clamp(max=1.0) / 64
        prof.after(step)
    text = (tmp_path / "profile_rank1.txt").read_text()
    assert "steps 2..3" in text and "ms per step" in text
    mm = [line for line in text.splitlines() if line.split()[:1] == ["aten::mm"]]
    assert mm and int(mm[0].split()[-1]) == 5, mm
    trace = json.loads((tmp_path / "trace_rank1.json").read_text())
    assert trace["traceEvents"]


def test_bench_train_profiles_the_timed_steps_but_the_last(tmp_path: Path) -> None:
    out = tmp_path / "prof"
    res = subprocess.run([sys.executable, "-m", "launcher", "bench", "train", "--config", "demo_cpu", "--nproc", "1",
                          "--steps", "3", "--warmup", "1", "--device-data", "--profile", str(out),
                          "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    text = (out / "profile_rank0.txt").read_text()
    assert "rank 0, steps 2..3" in text  # timed steps 2..4, the last one left out
    assert "aten::convolution" in text or "aten::mkldnn_convolution" in text
