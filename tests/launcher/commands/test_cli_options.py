"""`pfc` command-line options that no other test set to a value other than their default, each set and its
effect checked: ``plan --no-discface``, ``data pack --quality`` and ``--root``, ``data synth --seed``,
``eval --roc-dir``, ``--heldout`` and ``--batch-size``, ``export onnx --tolerance``; and the rendezvous
options of ``pfc train`` that only a multi-node launch reads, refused without ``--rdzv-endpoint`` (they were
silently ignored: torchrun's ``--standalone`` draws its own id)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from launcher.cli import app
from tests.support.runs import _pfc, refused_in_one_line

SIDE = 16


def _invoke(*args: str) -> str:
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a tiny labelled dataset's prefix, its verification .bin)."""
    from data_pipeline.synth import default_val_bin, generate

    prefix = tmp_path_factory.mktemp("cli_options") / "train"
    generate(prefix, 6, 3, image_size=SIDE, val_identities=6, val_pairs=20, seed=1, workers=1)
    return prefix, default_val_bin(prefix)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny backbone file, as `pfc eval` and `pfc export` take it."""
    import torch

    from data_pipeline.atomic import atomic_write
    from partialfc.backbones import get_backbone, save_backbone
    from tests.partialfc.backbones.helpers import calibrated

    torch.manual_seed(0)
    net = calibrated(get_backbone("tiny", embedding_size=8, image_size=SIDE, width=0.5), (SIDE, SIDE))
    return save_backbone(net, tmp_path_factory.mktemp("cli_weights") / "backbone.safetensors", write=atomic_write)


def test_plan_no_discface_leaves_out_discfaces_all_reduce(tmp_path: Path) -> None:
    """``pfc plan --no-discface``: the plan has no DiscFace all-reduce and sends fewer bytes per step."""
    plans = {}
    for flag in ("--discface", "--no-discface"):
        out = tmp_path / f"{flag}.json"
        _invoke("plan", "--classes", "1000", "--world-size", "4", "--batch", "8", "--dim", "16", "--worlds", "2",
                flag, "--json", str(out))
        plans[flag] = json.loads(out.read_text())["plan"]
    on, off = plans["--discface"], plans["--no-discface"]
    assert on["discface"] is True and off["discface"] is False
    assert "allreduce_discface_sum" in json.dumps(on) and "allreduce_discface_sum" not in json.dumps(off)
    assert off["comm_bytes_per_step"] < on["comm_bytes_per_step"]


def _image_folder(root: Path, identities: int = 2, per: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for i in range(identities):
        (root / f"id{i}").mkdir(parents=True)
        for j in range(per):
            pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)  # noise: JPEG size follows quality
            Image.fromarray(pixels).save(root / f"id{i}" / f"{j}.png")
    return root


def test_data_pack_quality_is_the_jpeg_quality_written(tmp_path: Path) -> None:
    """``pfc data pack --quality 10``: the summary says 10 and the records are much smaller than at the
    default 95 (the same images)."""
    src = _image_folder(tmp_path / "faces")
    sizes = {}
    for q in (None, "10"):
        out = tmp_path / f"q{q}" / "train"
        args = ["data", "pack", str(src), str(out), "--no-progress", "--json", str(out) + ".json"]
        _invoke(*args, *(["--quality", q] if q else []))
        assert json.loads(Path(str(out) + ".json").read_text())["quality"] == (int(q) if q else 95)
        sizes[q] = out.with_suffix(".rec").stat().st_size
    assert sizes["10"] < 0.5 * sizes[None], sizes


def test_data_pack_root_is_the_base_of_the_lst_paths(tmp_path: Path) -> None:
    """``pfc data pack LST --root DIR``: the .lst's relative paths are read under DIR (not the .lst's own
    folder, where they do not exist)."""
    src = _image_folder(tmp_path / "images")
    lst = tmp_path / "lists" / "train.lst"
    lst.parent.mkdir()
    files = sorted(src.rglob("*.png"))
    lst.write_text("".join(f"{n}\t{p.parent.name[2:]}\t{p.relative_to(src)}\n" for n, p in enumerate(files)))
    out = tmp_path / "packed" / "train"
    _invoke("data", "pack", str(lst), str(out), "--root", str(src), "--no-progress", "--json", str(tmp_path / "s.json"))
    summary = json.loads((tmp_path / "s.json").read_text())
    assert (summary["images"], summary["identities"], summary["skipped"]) == (4, 2, [])
    res = CliRunner().invoke(app, ["data", "pack", str(lst), str(tmp_path / "nope" / "train"), "--no-progress"])
    assert res.exit_code != 0  # without --root the paths are looked for next to the .lst


def test_data_synth_seed_draws_other_images(tmp_path: Path) -> None:
    """``pfc data synth --seed``: the same seed writes the same records, another seed other ones."""
    recs = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        prefix = tmp_path / name / "train"
        _invoke("data", "synth", str(prefix), "--identities", "3", "--images-per-identity", "2", "--image-size",
                str(SIDE), "--val-identities", "0", "--workers", "1", "--no-progress", "--seed", seed)
        recs[name] = prefix.with_suffix(".rec").read_bytes()
    assert recs["a"] == recs["b"] != recs["c"]


def test_eval_roc_dir_heldout_and_batch_size(synth: tuple[Path, Path], weights: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``pfc eval --roc-dir D``: one ROC PNG per .bin in D; ``--heldout PREFIX``: DiscFace's discrepancies of
    that set's identities in the JSON; ``--batch-size 5``: the backbone sees batches of at most 5 images."""
    import partialfc.backbones as backbones

    seen: list[int] = []
    load = backbones.load_backbone

    def counting_load(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        net = load(*args, **kwargs)  # type: ignore[arg-type]
        net.register_forward_pre_hook(lambda _m, inputs: seen.append(int(inputs[0].shape[0])))
        return net

    monkeypatch.setattr(backbones, "load_backbone", counting_load)
    prefix, val_bin = synth
    roc, out = tmp_path / "roc", tmp_path / "eval.json"
    _invoke("eval", str(weights), "--bin", str(val_bin), "--roc-dir", str(roc), "--heldout", str(prefix),
            "--batch-size", "5", "--json", str(out))
    assert (roc / f"roc_{val_bin.stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    disc = json.loads(out.read_text())["heldout_discrepancy"]
    assert disc["num_classes"] == 6 and disc["directional_deg"] > 0
    assert seen and max(seen) == 5, seen


def test_export_onnx_tolerance_decides_the_exit_code(weights: Path, tmp_path: Path) -> None:
    """``pfc export onnx --tolerance``: a relative difference above it exits 1 (EXCEEDED), one below it passes."""
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    ok = CliRunner().invoke(app, ["export", "onnx", str(weights), str(out), "--tolerance", "1",
                                  "--json", str(tmp_path / "ok.json")])
    assert ok.exit_code == 0 and "tolerance 1 (relative): OK" in ok.output, ok.output
    diff = json.loads((tmp_path / "ok.json").read_text())["max_rel_diff"]
    if diff == 0:
        pytest.skip("onnxruntime matched torch bit for bit: no tolerance below the difference to set")
    tight = CliRunner().invoke(app, ["export", "onnx", str(weights), str(out), "--tolerance", f"{diff / 2:g}"])
    assert tight.exit_code == 1 and "EXCEEDED" in tight.output, tight.output


@pytest.mark.parametrize(("option", "value"), [("--rdzv-id", "myjob-7"), ("--node-rank", "1"),
                                               ("--rdzv-timeout", "30")])
def test_rendezvous_options_without_an_endpoint_are_refused(synth: tuple[Path, Path], tmp_path: Path,
                                                            option: str, value: str) -> None:
    """``--rdzv-id``, ``--node-rank``, ``--rdzv-timeout`` shape the rendezvous of a multi-node launch
    (``--rdzv-endpoint``). Without one, torchrun started --standalone with an id of its own and the run
    went on: ``--rdzv-id myjob-7`` left a random uuid in OUTPUT/run_id (the metrics' run label). Refused
    in one line naming the option, before any rank starts."""
    prefix, _ = synth
    out = tmp_path / "run"
    r = _pfc(["train", "demo_cpu", "--data", str(prefix), "--output", str(out), "--nproc-per-node", "1",
              option, value, "--set", "train.steps=1", "--set", "model.backbone=tiny", "--set",
              f"model.image_size={SIDE}", "--set", "train.batch_size=4", "--set", "data.workers=0",
              "--set", "optim.warmup_steps=0"], timeout=120)
    line = refused_in_one_line(r)
    assert f"{option} {value}" in line and "--rdzv-endpoint" in line, line
    assert not (out / "run_id").exists()


@pytest.mark.parametrize("options", [["--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29999"], ["--max-restarts", "2"]])
def test_torchrun_options_without_nproc_per_node_are_refused(synth: tuple[Path, Path], tmp_path: Path,
                                                             options: list[str]) -> None:
    """Without ``--nproc-per-node`` pfc train runs in this process and starts no torchrun: ``--nnodes 2
    --rdzv-endpoint ...`` trained alone, ``--max-restarts 2`` restarted nothing. Refused in one line."""
    prefix, _ = synth
    out = tmp_path / "run"
    r = _pfc(["train", "demo_cpu", "--data", str(prefix), "--output", str(out), *options, "--set", "train.steps=1",
              "--set", "model.backbone=tiny", "--set", f"model.image_size={SIDE}", "--set", "train.batch_size=4",
              "--set", "data.workers=0", "--set", "optim.warmup_steps=0"], timeout=120)
    line = refused_in_one_line(r)
    assert f"{options[0]} {options[1]}" in line and "--nproc-per-node" in line, line
    assert not (out / "run_id").exists()
