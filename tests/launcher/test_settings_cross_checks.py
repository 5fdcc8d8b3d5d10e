"""Settings that only mean something together (review 32): two verification sets of one name, a freeze as
long as the run, exporter settings with metrics off, and the model options judged against the backbone that
checkpoint.init_backbone's file brings. Config-level where the rule is the config's; one tiny real `pfc`
run for what happens across processes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from data_pipeline.atomic import atomic_write
from launcher import config as config_module
from launcher.config import ConfigError, builtin_config, dump_config, load_config, val_set_name
from launcher.trainer.finetune import adopt_init_backbone
from partialfc.backbones import get_backbone, save_backbone
from tests.support.runs import _pfc, _train_args, dataset, refused_in_one_line  # noqa: F401


def _backbone_file(path: Path, name: str, **kw: object) -> Path:
    net = get_backbone(name, embedding_size=8, image_size=16, width=0.125, **kw)  # type: ignore[arg-type]
    return save_backbone(net, path, write=atomic_write)


# --- data.val_bins: one name per set -------------------------------------------------------------------


@pytest.mark.parametrize(("bins", "name"), [(["a/val.bin", "b/val.bin"], "val"), (["x/lfw.bin", "y/lfw"], "lfw"),
                                           (["cfp_fp.bin", "lfw.bin", "lfw.bin"], "lfw")])
def test_two_verification_sets_of_one_name_are_refused_naming_both(bins, name):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"data.val_bins=[{', '.join(bins)}]"])
    text = str(err.value)
    assert "\n" not in text and "data.val_bins" in text and "rename one" in text, text
    assert f"{bins[-2]} and {bins[-1]} are both the verification set {name!r}" in text, text


def test_distinct_sets_keep_a_result_each():
    bins = ["a/lfw.bin", "a/cfp_fp.bin", "b/agedb_30.bin"]
    cfg = load_config(None, [f"data.val_bins=[{', '.join(bins)}]"])
    # the names evaluate_bins keys its results by, and the stems metrics.jsonl logs them by: one each
    assert len({val_set_name(b) for b in cfg.data.val_bins}) == len({Path(val_set_name(b)).stem for b in bins}) == 3


def test_pfc_refuses_two_sets_of_one_name_in_one_line():
    r = _pfc(["config", "show", "demo_cpu", "--val-bin", "a/val.bin", "--val-bin", "b/val.bin"], timeout=120)
    line = refused_in_one_line(r)
    assert "a/val.bin and b/val.bin are both the verification set 'val'" in line, line


def test_pfc_eval_refuses_two_sets_of_one_name_in_one_line(tmp_path):
    model = _backbone_file(tmp_path / "m.safetensors", "tiny")
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "val.bin").write_bytes(b"")  # refused before any is read
    r = _pfc(["eval", str(model), "--bin", str(tmp_path / "a" / "val.bin"), "--bin", str(tmp_path / "b" / "val.bin")],
             timeout=120)
    line = refused_in_one_line(r)
    assert "are both the verification set 'val'" in line and line.startswith("pfc eval: --bin:"), line


# --- train.freeze_backbone_steps < train.steps ---------------------------------------------------------


def test_a_freeze_as_long_as_the_run_is_refused():
    for freeze, steps in ((10, 10), (11, 10)):
        with pytest.raises(ConfigError, match=rf"train\.freeze_backbone_steps={freeze} is not less than "
                                              rf"train\.steps={steps}: only the head would train"):
            load_config(None, [f"train.freeze_backbone_steps={freeze}", f"train.steps={steps}"])
    assert load_config(None, ["train.freeze_backbone_steps=9", "train.steps=10"]).train.freeze_backbone_steps == 9
    assert load_config(None, ["train.steps=1"]).train.freeze_backbone_steps == 0  # no freeze: any length


@pytest.mark.parametrize("recipe", sorted(p.stem for p in builtin_config("demo_cpu").parent.glob("*.yaml")))
def test_every_recipe_loads_with_its_own_steps(recipe):
    cfg = load_config(builtin_config(recipe), ["data.val_bins=[v/val.bin]"])  # keep_best needs a set
    assert cfg.train.freeze_backbone_steps < cfg.train.steps


def test_finetune_recipe_shortened_below_its_freeze_is_refused():
    freeze = load_config(builtin_config("finetune_small"), ["data.val_bins=[v/val.bin]"]).train.freeze_backbone_steps
    assert freeze > 0
    with pytest.raises(ConfigError, match=rf"freeze_backbone_steps={freeze} is not less than train\.steps={freeze}"):
        load_config(builtin_config("finetune_small"), ["data.val_bins=[v/val.bin]", f"train.steps={freeze}"])


# --- exporter settings with metrics off ------------------------------------------------------------------


@pytest.fixture
def fresh_warnings(monkeypatch, caplog):
    monkeypatch.setattr(config_module, "_warned", set())
    for name in ("RANK", "SLURM_PROCID", "PFC_ERROR_DIR"):
        monkeypatch.delenv(name, raising=False)
    caplog.set_level(logging.WARNING, logger="pfc")
    return caplog


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "pfc"]


def test_exporter_settings_with_metrics_off_are_one_warning(fresh_warnings):
    load_config(None, ["metrics.pushgateway=gw:9091", "metrics.job=train", "metrics.host=0.0.0.0",
                       "metrics.port_base=9500", "metrics.port_policy=next-free", "metrics.push_interval_s=5",
                       "metrics.run_id=r1"])
    (line,) = _warnings(fresh_warnings)
    assert line.startswith("metrics.port_base, metrics.port_policy, metrics.pushgateway, "
                           "metrics.push_interval_s, metrics.job have no effect: metrics.enabled is false"), line
    # metrics.run_id is not in it: it is also the run identity written to <output>/run_id (the test below);
    # nor metrics.host: the SLURM script, the PyTorchJob and compose set it for every job
    assert "run_id" not in line and "metrics.host" not in line


def test_no_warning_when_the_settings_take_effect_or_are_the_defaults(fresh_warnings, tmp_path):
    load_config(None, ["metrics.enabled=true", "metrics.pushgateway=gw:9091", "metrics.job=train"])
    load_config(None, ["metrics.run_id=r1"])
    load_config(None, ["metrics.job=pfc"])  # its default
    saved = tmp_path / "config.yaml"  # a run folder's config.yaml sets every field, to its default here
    saved.write_text(dump_config(load_config(None)))
    load_config(saved)
    assert _warnings(fresh_warnings) == []
    load_config(saved, ["metrics.pushgateway=gw:9091"])
    assert _warnings(fresh_warnings) == ["metrics.pushgateway has no effect: metrics.enabled is false, so no "
                                         "exporter serves and nothing is pushed; set metrics.enabled=true to use it"]


def test_two_ranks_warn_once_and_run_id_still_names_the_run(dataset, tmp_path):  # noqa: F811
    prefix, _ = dataset
    out = tmp_path / "run"
    args = _train_args(prefix, out, **{"train.steps": 2, "checkpoint.every_steps": 2, "optim.warmup_steps": 0,
                                       "metrics.pushgateway": "127.0.0.1:9", "metrics.run_id": "kept-name"})
    r = _pfc([*args, "--nproc-per-node", "2"], timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    said = [x for x in (r.stdout + r.stderr).splitlines() if "metrics.pushgateway has no effect" in x]
    assert len(said) == 1, said
    assert (out / "run_id").read_text().strip() == "kept-name"  # run_id acts with metrics off: not warned


# --- the model options against the backbone of checkpoint.init_backbone ----------------------------------


def test_vit_file_with_dropout_is_one_config_error(tmp_path):
    vit = _backbone_file(tmp_path / "vit_t.safetensors", "vit_t")
    with pytest.raises(ConfigError) as err:
        adopt_init_backbone(load_config(None, [f"checkpoint.init_backbone={vit}", "model.dropout=0.2"]))
    text = str(err.value)
    assert "\n" not in text and f"checkpoint.init_backbone {vit}" in text, text
    assert "model.dropout must be 0 for vit_t" in text, text


def test_pfc_train_refuses_vit_file_with_dropout_in_one_line(tmp_path):
    vit = _backbone_file(tmp_path / "vit_t.safetensors", "vit_t")
    (tmp_path / "c.yaml").write_text("model:\n  dropout: 0.2\n")  # no model.backbone: the file's
    r = _pfc(["train", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "run"), "--set",
              f"checkpoint.init_backbone={vit}"], timeout=120)
    line = refused_in_one_line(r)
    assert "model.dropout must be 0 for vit_t" in line and str(vit) in line, line


def test_vit_options_are_judged_against_the_files_backbone(tmp_path):
    vit = _backbone_file(tmp_path / "vit_t.safetensors", "vit_t")
    cfg = adopt_init_backbone(load_config(None, [f"checkpoint.init_backbone={vit}", "model.drop_path=0.05",
                                                 "model.mask_ratio=0.0"]))
    assert (cfg.model.backbone, cfg.model.drop_path, cfg.model.mask_ratio) == ("vit_t", 0.05, 0.0)
    tiny = _backbone_file(tmp_path / "tiny.safetensors", "tiny")
    loaded = load_config(None, [f"checkpoint.init_backbone={tiny}", "model.drop_path=0.05"])
    with pytest.raises(ConfigError, match=rf"checkpoint\.init_backbone {tiny}\): model\.drop_path and "
                                          r"model\.mask_ratio apply to vit_t, vit_s, vit_b only, not tiny"):
        adopt_init_backbone(loaded)
    # without a file the default backbone is the one judged, at load
    with pytest.raises(ConfigError, match=r"apply to vit_t, vit_s, vit_b only, not iresnet50"):
        load_config(None, ["model.drop_path=0.05"])


def test_an_image_size_is_judged_against_the_files_backbone(tmp_path):
    """A ViT file at 18 px (no multiple of iresnet50's 16) with model.image_size=18 given: it was refused as
    'a multiple of 16 for iresnet50', the default backbone, before the file's was adopted."""
    net = get_backbone("vit_t", embedding_size=8, image_size=18, width=0.125)
    vit = save_backbone(net, tmp_path / "vit18.safetensors", write=atomic_write)
    cfg = adopt_init_backbone(load_config(None, [f"checkpoint.init_backbone={vit}", "model.image_size=18"]))
    assert (cfg.model.backbone, cfg.model.image_size) == ("vit_t", 18)
    tiny = _backbone_file(tmp_path / "tiny.safetensors", "tiny")  # 16 px: 18 is neither its size nor its stride's
    with pytest.raises(ValueError, match=r"model\.image_size=18 but checkpoint\.init_backbone"):
        adopt_init_backbone(load_config(None, [f"checkpoint.init_backbone={tiny}", "model.image_size=18"]))
    with pytest.raises(ConfigError, match=r"image_size 18 must be a multiple of 16 for iresnet50"):
        load_config(None, ["model.image_size=18"])  # without a file: the default backbone, at load


def test_mobilefacenet_options_are_judged_against_the_files_backbone(tmp_path):
    mbf = _backbone_file(tmp_path / "mbf.safetensors", "mobilefacenet", scale=2, blocks=(1, 2, 2, 1))
    cfg = adopt_init_backbone(load_config(None, [f"checkpoint.init_backbone={mbf}", "model.scale=2",
                                                 "model.blocks=[1,2,2,1]"]))
    assert (cfg.model.backbone, cfg.model.scale, cfg.model.blocks) == ("mobilefacenet", 2, (1, 2, 2, 1))
    with pytest.raises(ConfigError, match=r"apply to mobilefacenet only, not iresnet50"):
        load_config(None, ["model.scale=2"])


@pytest.mark.parametrize("steps", [5, 300, 2999, 3000])
def test_a_study_shorter_than_the_recipe_fits_its_freeze_and_warmup(steps):
    """`pfc bench augment/discface/train --steps N` on finetune_small (freeze 300 of 3000 steps): the freeze
    keeps its share of the run, and the config loads (it was refused for N <= 300)."""
    from launcher.bench.study_runs import fitted_schedule

    recipe = builtin_config("finetune_small")
    cfg = load_config(recipe, ["data.val_bins=[v/val.bin]"])
    sets = fitted_schedule(cfg, steps)
    fitted = load_config(recipe, ["data.val_bins=[v/val.bin]", f"train.steps={steps}", *sets])
    assert fitted.optim.warmup_steps == min(cfg.optim.warmup_steps, steps)
    share = cfg.train.freeze_backbone_steps * steps // cfg.train.steps
    assert fitted.train.freeze_backbone_steps == (cfg.train.freeze_backbone_steps if steps > 300 else share)


def test_wandb_settings_without_the_wandb_backend_are_one_warning(fresh_warnings):
    load_config(None, ["log.wandb_project=faces", "log.wandb_mode=online"])
    assert _warnings(fresh_warnings) == ["log.wandb_project, log.wandb_mode have no effect: log.backends (jsonl) "
                                         "has no wandb; add wandb to log.backends to log to W&B"]
    fresh_warnings.clear()
    load_config(None, ["log.wandb_project=faces", "log.backends=[jsonl, wandb]"])
    load_config(None, ["log.wandb_mode=offline"])  # its default
    assert _warnings(fresh_warnings) == []
    load_config(None, ["log.backends=[]", "log.wandb_mode=online"])
    assert _warnings(fresh_warnings) == ["log.wandb_mode has no effect: log.backends is empty: no wandb; add wandb "
                                         "to log.backends to log to W&B"]
