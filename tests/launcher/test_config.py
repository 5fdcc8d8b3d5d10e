"""The config schema: defaults < file < --set, and every invalid field named in the error."""

from __future__ import annotations

import math
import typing

import annotated_types as at
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from launcher.config import Config, ConfigError, builtin_config, load_config, resolve_config_path


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, typing.Any]]:
    out = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _leaf_fields(ann, prefix + name + ".")
        else:
            out.append((prefix + name, info))
    return out


LEAVES = _leaf_fields(Config)


def _bounds(info) -> dict[str, float]:
    b: dict[str, float] = {}
    for m in info.metadata:
        for attr, cls in (("ge", at.Ge), ("gt", at.Gt), ("le", at.Le), ("lt", at.Lt)):
            if isinstance(m, cls):
                b[attr] = getattr(m, attr)
    return b


def _invalid_values(info) -> list[typing.Any]:
    """Values that the field must refuse: a wrong type always, and out-of-range numbers where bounded."""
    vals: list[typing.Any] = [{"not": "a value"}]
    b = _bounds(info)
    if "ge" in b:
        vals.append(b["ge"] - 1)
    if "gt" in b:
        vals.append(b["gt"])
    if "le" in b:
        vals.append(b["le"] + 1)
    if "lt" in b:
        vals.append(b["lt"])
    if typing.get_origin(info.annotation) is typing.Literal:
        vals.append("no-such-choice")
    return vals


@pytest.mark.parametrize(("field", "info"), LEAVES, ids=[f for f, _ in LEAVES])
def test_every_field_rejects_invalid_values_and_names_itself(field, info):
    for bad in _invalid_values(info):
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{field}={yaml.safe_dump(bad, default_flow_style=True).strip()}"])
        assert field in str(e.value), f"error for {field}={bad!r} does not name the field:\n{e.value}"


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_in_range_numbers_accepted_out_of_range_refused(data):
    numeric = [(f, i) for f, i in LEAVES if i.annotation in (int, float) and _bounds(i)]
    field, info = data.draw(st.sampled_from(numeric))
    b = _bounds(info)
    lo = b.get("ge", b.get("gt", -1e6))
    hi = b.get("le", b.get("lt", 1e6))
    if info.annotation is int:
        lo_i = math.ceil(lo) + (1 if "gt" in b else 0)
        hi_i = math.floor(hi) - (1 if "lt" in b else 0)
        good = data.draw(st.integers(lo_i, hi_i))
        if field == "model.image_size":  # also constrained to multiples of 16
            good = max(16, good // 16 * 16)
        sides = []
        if "ge" in b or "gt" in b:
            sides.append(st.integers(max_value=lo_i - 1))
        if "le" in b or "lt" in b:
            sides.append(st.integers(min_value=hi_i + 1))
        bad = data.draw(st.one_of(*sides))
    else:
        good = data.draw(st.floats(lo, hi, exclude_min="gt" in b, exclude_max="lt" in b))
        fsides = []
        if "ge" in b or "gt" in b:
            fsides.append(st.floats(max_value=lo, exclude_max="ge" in b, allow_nan=False,
                                    allow_infinity=False))
        if "le" in b or "lt" in b:
            fsides.append(st.floats(min_value=hi, exclude_min="le" in b, allow_nan=False,
                                    allow_infinity=False))
        bad = data.draw(st.one_of(*fsides))
    overrides = [f"{field}={good!r}"]
    if field == "dist.zero_stage" and good:
        overrides.append("dist.engine=deepspeed")
    if field == "model.scale" and good != 1:
        overrides.append("model.backbone=mobilefacenet")  # the scale of the other backbones is refused
    if field == "optim.warmup_steps":  # warm-up must fit in the run (refused otherwise)
        overrides.append(f"train.steps={max(good, 1)}")
    if field == "train.freeze_backbone_steps":  # the backbone must train for a step at least (refused otherwise)
        overrides.append(f"train.steps={good + 1}")
    cfg = load_config(None, overrides)
    section, name = field.rsplit(".", 1) if "." in field else ("", field)
    node = cfg
    for p in filter(None, section.split(".")):
        node = getattr(node, p)
    assert getattr(node, name) == pytest.approx(good)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [f"{field}={bad!r}"])


def test_precedence_defaults_then_file_then_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.05\ntrain:\n  steps: 7\n")
    cfg = load_config(f, ["train.steps=9"])
    assert cfg.optim.lr == 0.05 and cfg.train.steps == 9 and cfg.optim.momentum == 0.9


@pytest.mark.parametrize("text", ["output: runs/x\noptim:\n  # lr: 0.05\ntrain:\n  steps: 7\n",
                                  '{"output": "runs/x", "optim": null, "train": {"steps": 7}}'],
                         ids=["yaml-keys-commented-out", "json-null"])
@pytest.mark.parametrize("sets", [[], ["optim.lr=0.05"]], ids=["file-only", "with-set"])
def test_a_null_section_means_its_defaults(tmp_path, text, sets):
    """A section left empty (YAML reads ``optim:`` with its keys commented out as null) is its defaults,
    alone and under ``--set optim.lr=...``; the rest of the file still applies."""
    f = tmp_path / "c.yaml"
    f.write_text(text)
    cfg = load_config(f, sets)
    assert cfg.optim.lr == (0.05 if sets else Config().optim.lr)
    assert cfg.optim.momentum == 0.9 and cfg.train.steps == 7 and cfg.output == "runs/x"


def test_a_null_nested_section_and_a_set_to_null_are_defaults_too(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  augment:\n    color:\n")
    cfg = load_config(f, ["data.augment.color.p=0.8"])
    assert cfg.data.augment.color.p == 0.8
    assert cfg.data.augment.color.brightness == Config().data.augment.color.brightness
    assert load_config(None, ["optim.lr=0.05", "optim=null"]).optim == Config().optim


def test_a_set_below_a_plain_field_names_the_field_and_its_value(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  prefix:\n")
    with pytest.raises(ConfigError, match=r"^override 'data\.prefix\.x=1': data\.prefix holds None, not a section"):
        load_config(f, ["data.prefix.x=1"])
    with pytest.raises(ConfigError, match=r"optim\.lr holds 0\.05, not a section"):
        load_config(None, ["optim.lr=0.05", "optim.lr.x=1"])


def test_unknown_field_and_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        load_config(None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"section\.field=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(None, ["dist.zero_stage=2"])


def test_image_size_must_be_a_multiple_of_16():
    with pytest.raises(ConfigError, match=r"model\.image_size = 40: .*multiple of 16"):
        load_config(None, ["model.image_size=40"])


def test_builtin_recipes_validate():
    for name in ("demo_cpu", "ms1mv3_r50_pfc01_discface", "webface42m_r100_pfc02"):
        cfg = load_config(builtin_config(name))
        assert cfg.model.image_size % 16 == 0
    assert resolve_config_path("demo_cpu").name == "demo_cpu.yaml"
    with pytest.raises(ConfigError, match="built-in recipes"):
        resolve_config_path("nope")
    # a path names a file only: a typo in the path to an edited copy is not the stock recipe of that name
    with pytest.raises(ConfigError, match=r"config file /no/such/dir/demo_cpu.yaml does not exist$"):
        resolve_config_path("/no/such/dir/demo_cpu.yaml")
    with pytest.raises(ConfigError, match=r"does not exist$"):
        resolve_config_path("configs/demo_cpu.yaml")


# -- issue 13, item 7: values of the wrong type, warm-up longer than the run, ZeRO-3 -------------------

@pytest.mark.parametrize("item, field, expected", [
    ("train.batch_size=on", "train.batch_size", "expected an integer, got the boolean True"),
    ("checkpoint.keep_last=yes", "checkpoint.keep_last", "expected an integer, got the boolean True"),
    ("optim.grad_accum=true", "optim.grad_accum", "expected an integer, got the boolean True"),
    ("optim.lr=off", "optim.lr", "expected a number, got the boolean False"),
    ("head.num_classes=yes", "head.num_classes", "got the boolean True"),
    ("data.flip=1", "data.flip", "expected true or false, got 1"),
    ("train.channels_last=maybe", "train.channels_last", "expected true or false, got 'maybe'"),
])
def test_values_of_the_wrong_type_are_refused_naming_the_field(item, field, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [item])
    assert "\n" not in str(e.value)  # one error: one line
    line = str(e.value).split("): ", 1)[1]
    assert line.startswith(field + " =") and expected in line, str(e.value)


def test_flags_still_take_booleans_in_yaml_spellings():
    cfg = load_config(None, ["data.flip=off", "train.channels_last=yes", "checkpoint.resume=false"])
    assert cfg.data.flip is False and cfg.train.channels_last is True and cfg.checkpoint.resume is False


def test_warmup_longer_than_the_run_is_refused():
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps=20 is more than train\.steps=10"):
        load_config(None, ["train.steps=10", "optim.warmup_steps=20"])
    assert load_config(None, ["train.steps=10", "optim.warmup_steps=10"]).optim.warmup_steps == 10


def test_zero3_is_refused_with_its_reason():
    with pytest.raises(ConfigError, match=r"dist\.zero_stage = 3: .*ZeRO-3 is not supported: it partitions"):
        load_config(None, ["dist.engine=deepspeed", "dist.zero_stage=3"])


def test_fp16_with_deepspeed_is_refused_naming_what_to_use_instead():
    """DeepSpeed's fp16 mode casts the weights to half while the backbones' embedding layers stay float32:
    the first forward would fail, so the config refuses it and names the working combinations."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["dist.engine=deepspeed", "train.amp=fp16"])
    line = next(x for x in str(e.value).splitlines() if "train.amp=fp16 does not work" in x)
    assert "dist.engine=deepspeed" in line and "train.amp=bf16 with DeepSpeed" in line, line
    assert "train.amp=fp16 with dist.engine=ddp" in line, line
    assert load_config(None, ["dist.engine=deepspeed", "train.amp=bf16"]).train.amp == "bf16"
    assert load_config(None, ["dist.engine=ddp", "train.amp=fp16"]).train.amp == "fp16"


@pytest.mark.parametrize(("name", "ranks", "images"), [
    ("ms1mv3_r50_pfc01_discface", 8, 5_179_510),
    ("webface42m_r100_pfc02", 64, 42_474_557),
])
def test_large_recipes_train_twenty_epochs_as_arcface_torch(name: str, ranks: int, images: int) -> None:
    """The recipes' lengths on the world sizes their comments name: 20 epochs, as arcface_torch's (the WebFace42M
    one was 400,000 steps, about 77 epochs, with ArcFace where arcface_torch trains WebFace42M with CosFace)."""
    cfg = load_config(builtin_config(name))
    epochs = cfg.train.steps * cfg.train.batch_size * ranks / images
    assert 19.5 <= epochs <= 20.5, (name, epochs)
    assert str(ranks) in builtin_config(name).read_text().splitlines()[1]
    if name.startswith("webface42m"):
        assert tuple(cfg.head.margin) == (1.0, 0.0, 0.4) and cfg.optim.lr == 0.6
        assert 3.9 <= cfg.optim.warmup_steps * cfg.train.batch_size * ranks / images <= 4.1
