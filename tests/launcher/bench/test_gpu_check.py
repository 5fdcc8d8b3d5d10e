"""`make gpu-check`'s script in its dry run (CPU, tiny sizes), so that it cannot rot without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]  # tests/launcher/bench/ -> the repository
SCRIPT = REPO / "scripts" / "gpu_check.py"
STEPS = ["env", "pytest_gpu", "bench_head", "bench_train_device", "synth", "train_e2e", "bench_train_loader",
         "train_deepspeed"]


def _run(out: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("OUT", None)
    # One intra-op thread in every step's process (torchrun's ranks keep a set value), as tests/conftest.py
    # has the tests: the dry run's tensors are tiny, and on a shared 2-core machine a second thread only spins
    # (the whole dry run: 82 s with two, 63 s with one, at a load of 2).
    env.setdefault("OMP_NUM_THREADS", "1")
    env["TMPDIR"] = str(out / "tmp")  # the script's scratch folder: removed when it ends
    (out / "tmp").mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.multiprocess  # 1-5 minutes on a 2-core machine (about 20 Python processes start)
def test_dry_run_runs_every_step_and_writes_json_log_and_summary(tmp_path: Path) -> None:
    proc = _run(tmp_path, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["dry_run"] is True and list(doc["steps"]) == STEPS
    bad = {k: v.get("error") for k, v in doc["steps"].items() if v["status"] != "ok"}
    assert not bad, bad
    st = doc["steps"]
    assert doc["env"]["cuda_available"] is False and doc["env"]["pydantic"]
    # the gpu tests ran through their CPU stand-in (those only CUDA can show skip), the head's every dtype
    # and optimizer against float64 (tests/partialfc/test_head_cuda.py) among them
    assert st["pytest_gpu"]["counts"]["failed"] == 0 and st["pytest_gpu"]["counts"]["passed"] >= 8
    head_steps = [t["outcome"] for t in st["pytest_gpu"]["tests"] if "test_head_cuda" in t["test"]]
    assert head_steps == ["passed"] * 6, head_steps
    shapes = list(st["bench_head"]["shapes"].values())
    assert len(shapes) == 3 and shapes[-1]["largest_that_fits"] and shapes[-1]["num_classes"] > shapes[1]["num_classes"]
    for s in shapes:
        assert s["step_s"] > 0 and s["gemm_floor_s"] > 0 and s["ratio_to_floor"] > 0
        assert s["head_peak_bytes"] > 0 and s["planned_peak_bytes"] > 0 and s["weights_plus_momentum_bytes"] > 0
        assert s["launches_per_step"]["kernels"] > 0  # aten operators on the CPU (kernels and syncs on a GPU)
    # the head stored in bf16 (stochastic rounding) at the first C, against that C's fp32 run
    bf16 = st["bench_head"]["bf16"]
    assert bf16["num_classes"] == shapes[0]["num_classes"] and bf16["rounding"] == "stochastic"
    assert (bf16["head_dtype"], bf16["weight_dtype"], shapes[0]["weight_dtype"]) == ("bf16", "bfloat16", "float32")
    assert bf16["step_s"] > 0 and bf16["ratio_to_floor"] > 0 and bf16["measured_over_planned"] > 0
    assert bf16["step_over_fp32_step"] == pytest.approx(bf16["step_s"] / shapes[0]["step_s"])
    assert bf16["weights_plus_momentum_bytes"] * 2 == shapes[0]["weights_plus_momentum_bytes"]
    assert "--dtype bf16" in (tmp_path / "gpu_check.log").read_text()
    # the largest C is what the planner says fits the (pretend) device memory, and the next 1000 would not
    from launcher.planner import plan_rank

    c, budget = shapes[-1]["num_classes"], st["bench_head"]["largest_c_memory_budget_bytes"]
    assert plan_rank(c, 1, 32, 64, 0.1, "fp32", discface=False).total_bytes <= budget
    assert plan_rank(c + 1000, 1, 32, 64, 0.1, "fp32", discface=False).total_bytes > budget
    bf16 = st["bench_train_device"]["bf16"]
    assert bf16["images_per_s"] > 0 and bf16["floor_images_per_s"] > 0 and bf16["step_over_floor"] > 0
    assert bf16["kernels"] == {"deterministic": False, "cudnn_benchmark": None}  # the run's, from its summary
    assert st["bench_train_loader"]["images_per_s"] > 0 and st["bench_train_loader"]["loader"] == "torch"
    assert st["synth"]["images"] == 200 and st["synth"]["wall_s"] > 0
    e2e = st["train_e2e"]
    assert e2e["first_run"]["steps"] == 4 and e2e["resumed_run"]["steps"] == 6 and e2e["resumed_run"]["resumed"]
    assert e2e["first_run"]["eval"]
    ds = st["train_deepspeed"]  # ZeRO-1 under gloo here; its checkpoint at step 4 resumed to 6
    assert ds["first_run"]["steps"] == 4 and ds["first_run"]["checkpoint"] == "step_00000004"
    assert ds["resumed_run"]["steps"] == 6 and ds["resumed_run"]["resumed"]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "-m pytest -m gpu" in log and "bench head" in log and "resumed from" in log
    assert 'dist.engine="deepspeed"' in log and "deepspeed 0." in log  # the ZeRO run, with DeepSpeed imported
    # the summary table comes last
    tail = proc.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(tail) if line.startswith("step ") and "status" in line)
    assert [line.split()[0] for line in tail[header + 1:] if not line.startswith(" ")] == STEPS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.log", "tmp"]
    assert not list((tmp_path / "tmp").glob("pfc-gpu-check-*")), "the scratch folder was left behind"
    # the README's table is made from this JSON: every row has its figure (fp16 is not timed on a CPU)
    table = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_readme_table.py"),
                            str(tmp_path / "gpu_check.json")], capture_output=True, text=True, timeout=60)
    rows = [line for line in table.stdout.splitlines() if line.startswith("| ") and "| goal |" not in line]
    assert table.returncode == 0 and len(rows) == 13 and "dry run on the CPU" in table.stdout, table.stdout
    assert [r for r in rows if "failed" in r or "not run" in r] == [r for r in rows if "fp16" in r], rows
    assert "; bf16 head (stochastic rounding): " in rows[1] and "x the fp32 step" in rows[1], rows[1]
    assert any(line.startswith("  head C=1000 bf16") and " ok " in line for line in tail), tail


def test_a_failed_step_is_recorded_and_the_budget_skips_the_rest(tmp_path: Path) -> None:
    """--only picks steps; train_e2e without the synth step fails (recorded, exit 1, the script goes on);
    a spent --budget-s skips what is left, saying why."""
    proc = _run(tmp_path / "a", "--only", "train_e2e,bench_train_loader", timeout=120)
    assert proc.returncode == 1
    doc = json.loads((tmp_path / "a" / "gpu_check.json").read_text())
    assert list(doc["steps"]) == ["env", "train_e2e", "bench_train_loader"]
    assert doc["steps"]["env"]["status"] == "ok"
    for k in ("train_e2e", "bench_train_loader"):
        assert doc["steps"][k]["status"] == "failed" and "synth step failed" in doc["steps"][k]["error"]
    proc = _run(tmp_path / "b", "--only", "synth", "--budget-s", "2", timeout=60)
    assert proc.returncode == 1
    doc = json.loads((tmp_path / "b" / "gpu_check.json").read_text())
    assert {v["status"] for v in doc["steps"].values()} == {"skipped"}
    assert "budget is spent" in doc["steps"]["synth"]["error"]
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, str(SCRIPT), "--only", "nope"], check=True, capture_output=True, cwd=REPO)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_a_timed_out_step_ends_its_whole_process_tree(tmp_path: Path) -> None:
    """A step's command that started a process in a session of its own (as torchrun starts its ranks)
    is ended with it when the step times out: nothing is left running to hold the GPU."""
    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_check_runner import Runner, StepError

    pidfile = tmp_path / "pid"
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
            f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(300)\n")
    runner = Runner(tmp_path, dry=False, total_budget_s=60)
    runner.step_deadline = time.monotonic() + 6
    t0 = time.monotonic()
    with pytest.raises(StepError, match="timed out"):
        runner.sh([sys.executable, "-c", code])
    runner.log.close()
    assert time.monotonic() - t0 < 30
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), f"process {pid} (its own session) outlived the step"
    assert "its process tree ended" in (tmp_path / "gpu_check.log").read_text()


def test_a_real_run_without_cuda_stops_after_the_env_step(tmp_path: Path) -> None:
    """Without --dry-run on a machine where torch sees no GPU, every later step would measure the CPU:
    the env step fails saying so and the rest are skipped (exit 1)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               CUDA_VISIBLE_DEVICES="")
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--only", "synth,bench_head"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["steps"]["env"]["status"] == "failed" and "sees no CUDA device" in doc["steps"]["env"]["error"]
    assert {k: v["status"] for k, v in doc["steps"].items() if k != "env"} == {"bench_head": "skipped",
                                                                                "synth": "skipped"}


def test_a_pytest_step_out_of_time_keeps_the_tests_it_finished(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The gpu tests' step runs out of its budget in a slow test: pytest, interrupted before the budget
    ends, still writes its report, so the tests it finished are recorded (not lost with the step)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_check

    tests = tmp_path / "test_slow.py"
    tests.write_text("import time\nimport pytest\npytestmark = pytest.mark.gpu\n"
                     "def test_a():\n    pass\ndef test_b():\n    assert False\n"
                     "def test_slow():\n    time.sleep(300)\n")
    monkeypatch.setattr(gpu_check, "GPU_TEST_PATHS", (str(tests),))
    out = tmp_path / "out"
    out.mkdir()
    check = gpu_check.Check(out, dry=False, total_budget_s=60)
    t0 = time.monotonic()
    check.step("pytest_gpu", 12, check.s_pytest)
    check.log.close()
    rec = check.result["steps"]["pytest_gpu"]
    assert time.monotonic() - t0 < 30
    assert rec["status"] == "failed" and "timed out" in rec["error"] and "2 test(s) reported" in rec["error"]
    assert rec["counts"] == {"passed": 1, "failed": 1, "skipped": 0}
    assert [t["test"].split("::")[1] for t in rec["tests"]] == ["test_a", "test_b"]
