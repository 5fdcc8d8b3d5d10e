"""`pfc bench` options set to a non-default value reach what the benchmark does: `bench train --config FILE
--device-data --warmup --workdir --keep`, `bench discface --hard`, `bench augment --config FILE --nproc 2`,
`bench data --scale --loader torch`; `bench data --device-id` refused in one line where nothing would decode
on that GPU, and the loader's options refused with `--scale`. `bench train` without `--keep` leaves no
scratch folder behind, also when its run fails."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import launcher.cli  # noqa: F401  (registers every command on the app)
from launcher.commands.groups import app
from launcher.config import load_config
from launcher.trainer.augment import enabled
from tests.support.pfc_forks import PfcForks
from tests.support.runs import _pfc, refused_in_one_line

# A config file whose values differ from demo_cpu's (the options' default), so that each can be traced.
TINY_YAML = {
    "model": {"backbone": "tiny", "embedding_size": 24, "image_size": 16},
    "train": {"batch_size": 4, "seed": 0},
    "head": {"sample_rate": 1.0},
    "data": {"workers": 0},
    "dist": {"backend": "gloo"},
}


@pytest.fixture(autouse=True)
def _one_thread_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The `pfc` processes too: tiny tensors on a shared 2-core machine, where spinning intra-op threads
    made a run 2-3x slower (as the conftest's fixture says for this process)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_YAML))
    return path


@pytest.fixture(scope="module")
def tiny_rec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset PREFIX of 4 identities x 2 images at 16 px."""
    from data_pipeline.synth import generate

    prefix = tmp_path_factory.mktemp("tiny") / "train"
    generate(prefix, 4, 2, image_size=16, val_identities=0, seed=0, workers=1)
    return prefix


def _run_config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


@pytest.mark.multiprocess
def test_bench_train_config_file_device_data_and_warmup(tmp_path: Path, pfc: PfcForks) -> None:
    """``--config FILE``: the file's model and batch are what ran; ``--device-data`` on a CPU: batches made
    on the CPU, no dataset written; ``--warmup 3 --steps 2``: 5 steps ran, steps 4-5 timed, said in the JSON;
    ``--workdir W --keep``: the run folder kept in W. The device is the one the run's summary.json names."""
    scratch, out = tmp_path / "w", tmp_path / "r.json"
    r = pfc.run(["bench", "train", "--config", str(_config_file(tmp_path)), "--device-data", "--warmup", "3",
                 "--steps", "2", "--nproc", "1", "--workdir", str(scratch), "--keep", "--json", str(out)], timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = json.loads(out.read_text())
    assert (res["backbone"], res["image_size"], res["batch_per_rank"]) == ("tiny", 16, 4)
    assert res["warmup_steps"] == 3 and res["timed_step_range"] == [4, 5] and res["steps_timed"] == 1
    cuda = torch.cuda.is_available()
    device, card = ("cuda", torch.cuda.get_device_name()) if cuda else ("cpu", None)
    summary = json.loads((scratch / "run" / "summary.json").read_text())
    assert summary["device"] == {"type": device, "name": card} and summary["steps"] == 5
    assert (res["device"], res["device_name"]) == (device, card)
    assert res["loader"] == "synthetic" and res["data"] == "synthetic, on the device"
    on = f"{device} ({card})" if card else device
    assert f"tiny 16px on {on}, 1 rank(s) x 4 (steps 4-5 timed)" in r.stdout
    assert res["workdir"] == str(scratch) and f"kept in {scratch}" in r.stdout
    assert not (scratch / "data").exists()  # no input pipeline: nothing was generated to read
    ran = _run_config(scratch / "run")
    assert ran["model"]["embedding_size"] == 24 and ran["data"]["loader"] == "synthetic"


@pytest.mark.multiprocess
def test_bench_train_leaves_no_scratch_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pfc: PfcForks) -> None:
    """Without --keep the temporary folder (the run's checkpoint) is deleted when the bench ends."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    r = pfc.run(["bench", "train", "--config", str(_config_file(tmp_path)), "--device-data", "--warmup", "0",
                 "--steps", "2", "--nproc", "1", "--json", str(tmp_path / "r.json")], timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert json.loads((tmp_path / "r.json").read_text())["workdir"] is None
    assert not list(tmp_path.glob("pfc-bench-train-*"))


@pytest.mark.multiprocess
def test_bench_train_whose_rank_is_killed_deletes_what_it_wrote(tmp_path: Path) -> None:
    """A rank SIGKILLed after step 1: the bench fails, and the data it generated and the run folder are
    deleted from --workdir, whose other files stay."""
    work = tmp_path / "w"
    (work / "data").mkdir(parents=True)
    (work / "mine.txt").write_text("the user's")
    (work / "data" / "notes.txt").write_text("the user's")
    r = _pfc(["bench", "train", "--config", str(_config_file(tmp_path)), "--warmup", "0", "--steps", "2",
              "--nproc", "1", "--workdir", str(work)], fault="kill:1", timeout=300)
    assert r.returncode != 0 and "--keep keeps it" in r.stderr, (r.stdout + r.stderr)[-3000:]
    # the ranks said why; the bench's own ending is one line, not its traceback
    assert r.stderr.rstrip().splitlines()[-1] == ("pfc: the benchmark's training run failed with exit "
                                                  "code 1 (its run folder is deleted; --keep keeps it)")
    assert "bench_train" not in r.stderr
    assert sorted(p.relative_to(work).as_posix() for p in work.rglob("*")) == ["data", "data/notes.txt", "mine.txt"]


@pytest.mark.multiprocess
def test_bench_train_keeps_a_given_workdir_whatever_its_name(tmp_path: Path, pfc: PfcForks) -> None:
    """A --workdir named ``data`` (empty, the bench's own folders in it deleted): the folder stays, as any given
    --workdir does (it was removed: taken for the data folder the bench makes inside its workdir)."""
    work = tmp_path / "data"
    work.mkdir()
    r = pfc.run(["bench", "train", "--config", str(_config_file(tmp_path)), "--device-data", "--warmup", "0",
                 "--steps", "2", "--nproc", "1", "--workdir", str(work)], timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert work.is_dir() and not list(work.iterdir())


@pytest.mark.multiprocess
def test_bench_augment_config_file_and_two_ranks(tmp_path: Path, pfc: PfcForks) -> None:
    """``--config FILE --nproc 2``: both runs train the file's model on two ranks (two head shards each)."""
    out, doc = tmp_path / "study", tmp_path / "r.json"
    r = pfc.run(["bench", "augment", "--output", str(out), "--config", str(_config_file(tmp_path)), "--nproc", "2",
                 "--seeds", "3", "--identities", "4", "--images-per-identity", "2", "--val-identities", "2",
                 "--val-pairs", "20", "--steps", "1", "--augment", "data.augment.grayscale.p=1.0",
                 "--json", str(doc)], timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = json.loads(doc.read_text())
    assert res["world_size"] == 2 and res["config"] == str(tmp_path / "tiny.yaml")
    for name in ("off_seed3", "on_seed3"):
        run = out / name
        assert json.loads((run / "summary.json").read_text())["world_size"] == 2
        assert len(list(run.glob("checkpoints/step_*/head/head_shard_*.safetensors"))) == 2
        model = _run_config(run)["model"]
        assert (model["embedding_size"], model["image_size"]) == (24, 16)
    # the study itself (this run is also test_augment's end-to-end check of `pfc bench augment`): one seed,
    # off and on, the same data and seed, only the 'on' run augmented, evaluated on unseen identities; seed 3,
    # not the file's train.seed (0), so that the runs' seed can only come from --seeds
    assert set(res["runs"]) == {"off_seed3", "on_seed3"} and res["hard_jitter"] and res["identities"] == 4
    assert res["augment_sets"] == ["data.augment.grayscale.p=1.0"]
    for run in res["runs"].values():
        assert 0.0 <= run["accuracy"] <= 1.0 and run["accuracy_std"] >= 0.0
    on, off = (load_config(out / f"{name}_seed3" / "config.yaml") for name in ("on", "off"))
    assert on.data.augment.grayscale.p == 1.0 and not enabled(off.data.augment)
    assert on.train.seed == off.train.seed == 3 and on.data.prefix == off.data.prefix
    assert "mean accuracy over seeds [3]" in r.stdout


@pytest.mark.parametrize(("loader", "extra", "says"), [
    ("torch", [], "--device-id 0 is for --loader dali's GPU decode; --loader torch decodes on the CPU"),
    ("dali", ["--scale", "100"], "--device-id 0 is for --loader dali's GPU decode; --scale decodes on the CPU"),
], ids=["torch", "scale"])
def test_bench_data_device_id_where_nothing_decodes_on_a_gpu_is_refused(
        tiny_rec: Path, tmp_path: Path, loader: str, extra: list[str], says: str) -> None:
    """The torch loader (and --scale) decode on the CPU: the result used to say "on cpu" as if the option
    had not been given."""
    res = CliRunner().invoke(app, ["bench", "data", str(tiny_rec), "--loader", loader, "--device-id", "0",
                                   "--batch", "4", "--seconds", "0.2", "--rounds", "1", "--workdir", str(tmp_path),
                                   *extra])
    assert res.exit_code == 2 and res.output.strip() == f"pfc bench data: {says} (leave --device-id out)"
    assert not list(tmp_path.iterdir())  # refused before anything ran (--scale builds its file here)


@pytest.mark.parametrize(("given", "says"), [
    (["--threads", "2"], "--threads: for the loader's throughput on a PREFIX"),  # its default, given
    (["--batch", "4", "--float"], "--batch, --float: for the loader's throughput on a PREFIX"),
    (["--seconds", "1", "--rounds", "1"], "--seconds, --rounds: for the loader's throughput on a PREFIX"),
    (["PREFIX"], "PREFIX: for the loader's throughput on a PREFIX"),
], ids=["threads", "batch-float", "seconds-rounds", "prefix"])
def test_bench_data_scale_refuses_the_loaders_options(tiny_rec: Path, tmp_path: Path, given: list[str],
                                                      says: str) -> None:
    """--scale decodes nothing: the options of the loader's throughput were silently ignored there."""
    given = [str(tiny_rec) if g == "PREFIX" else g for g in given]
    res = CliRunner().invoke(app, ["bench", "data", *given, "--scale", "100", "--workdir", str(tmp_path)])
    assert res.exit_code == 2 and res.output.startswith(f"pfc bench data: {says}; --scale N times"), res.output
    assert len(res.output.strip().splitlines()) == 1 and res.output.strip().endswith(" out)")
    assert not list(tmp_path.iterdir())  # refused before the file was built


@pytest.mark.parametrize(("given", "says"), [
    (["--world-size", "2"], "--world-size"),  # its default, given
    (["--identities", "3", "--keep"], "--identities, --keep"),
    (["--workdir", "W"], "--workdir"),
], ids=["world-size", "identities-keep", "workdir"])
def test_bench_data_on_a_prefix_refuses_the_scale_options(tiny_rec: Path, tmp_path: Path, given: list[str],
                                                           says: str) -> None:
    """Without --scale the options of the synthetic file were silently ignored (the loader ran anyway)."""
    given = [str(tmp_path / "w") if g == "W" else g for g in given]
    res = CliRunner().invoke(app, ["bench", "data", str(tiny_rec), "--batch", "4", "--seconds", "0.2",
                                   "--rounds", "1", *given])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [
        f"pfc bench data: {says}: only with --scale N (the synthetic N-image file); the loader's throughput on a "
        f"PREFIX reads that dataset as it is (leave {'it' if ',' not in says else 'them'} out)"]
    assert not (tmp_path / "w").exists()


def test_bench_data_scale_loader_torch_leaves_the_dali_step_out(tmp_path: Path) -> None:
    """``--scale --loader torch``: no DALI step (it ran wherever DALI imports, whatever --loader said)."""
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["bench", "data", "--scale", "100", "--world-size", "1", "--loader", "torch",
                                   "--workdir", str(tmp_path / "w"), "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "dali" not in json.loads(out.read_text()) and "DALI            not measured (--loader torch)" in res.output


@pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is not None,  # (importing DALI takes seconds)
                    reason="DALI is installed here")
def test_bench_data_scale_loader_dali_without_dali_is_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["bench", "data", "--scale", "100", "--loader", "dali", "--workdir", str(tmp_path)])
    assert res.exit_code == 2 and res.output.startswith("pfc bench data: --loader dali needs NVIDIA DALI"), res.output
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.device_count() > 8, reason="a machine with more than 8 GPUs")
def test_bench_data_device_id_of_a_gpu_that_is_not_there_is_one_line(tiny_rec: Path, pfc: PfcForks) -> None:
    """``--loader dali --device-id 8`` without that GPU: one line before DALI starts (its error was a
    traceback from the pipeline's build)."""
    n = torch.cuda.device_count()
    r = pfc.run(["bench", "data", str(tiny_rec), "--loader", "dali", "--device-id", "8", "--batch", "4",
                 "--seconds", "0.2", "--rounds", "1"], timeout=120)
    assert refused_in_one_line(r) == (f"pfc bench data: --device-id 8: no such CUDA device ({n} visible); "
                                      "leave it out to decode on the CPU")
