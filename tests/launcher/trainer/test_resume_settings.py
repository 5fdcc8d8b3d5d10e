"""Resume is exact next to the defaults: a run stopped at step 2 and resumed to 4 ends with every saved
tensor (backbone, head shards and their optimizer state, DiscFace's b) equal to the run that never
stopped, for each setting a user turns on that keeps state across steps."""

from __future__ import annotations

import pytest

from tests.support.distributed import run_ranks
from tests.support.runs import _assert_same_tensors, _latest, _overrides, _pfc, _train, _train_args

pytestmark = pytest.mark.multiprocess

SETTINGS = {
    "adamw": {"optim.name": "adamw"},
    "bf16_autocast": {"train.amp": "bf16"},
    "bf16_head": {"head.dtype": "bf16"},
    "grad_accum": {"optim.grad_accum": 2},
    "dali": {"data.loader": "dali"},
    # dropout draws from the global torch RNG, which the checkpoint saves: a resumed run must not draw from it
    # in a place the straight run does not (a DataLoader without a generator of its own draws its seed there)
    "dropout": {"model.dropout": 0.5},
    # (data.workers=2 is resumed here, with dropout drawing from the global RNG on top; its run alone was
    # dropped to keep the suite near 20 min)
    "dropout_loader_workers": {"model.dropout": 0.5, "data.workers": 2},
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_resume_is_bit_identical_with(dataset, tmp_path, name):
    if name == "dali":
        pytest.importorskip("nvidia.dali")
    prefix, _ = dataset
    common = {"train.steps": 4, "checkpoint.every_steps": 2, "optim.warmup_steps": 1, **SETTINGS[name]}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"

    def run(out, **extra):
        if common.get("data.workers"):  # DataLoader workers: real `pfc train` ranks (the harness's are daemons)
            r = _pfc([*_train_args(prefix, out, **common, **extra), "--nproc-per-node", "2"])
            assert r.returncode == 0, r.stderr[-3000:]
        else:
            run_ranks(_train, 2, _overrides(prefix, out, **common, **extra), timeout=300)

    run(straight)
    run(resumed, **{"train.stop_after": 2})
    assert _latest(resumed).name == "step_00000002"
    first_label = (resumed / "run_id").read_text()
    run(resumed)
    if common.get("data.workers"):  # torchrun --standalone: a new rendezvous id per launch, one run label
        assert (resumed / "run_id").read_text() == first_label != (straight / "run_id").read_text()
    assert _latest(straight).name == _latest(resumed).name == "step_00000004"
    _assert_same_tensors(_latest(straight), _latest(resumed))
