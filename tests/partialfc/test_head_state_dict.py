"""The head's sampler state (seed, step) is part of ``PartialFC.state_dict()`` (partialfc/head.py, as the
module's extra state): a resume through state_dict alone, not only through save_head / load_head, draws the
same rows and the same stochastic-rounding noise as the run it continues."""

from __future__ import annotations

import copy

import pytest
import torch

from partialfc import PartialFC
from partialfc.optimizer import SparseHeadOptimizer
from tests.partialfc.test_stochastic_rounding import _run as _steps  # the same 16-image steps, seeded by k

MARGIN = (1.0, 0.5, 0.0)


def _make(seed: int = 9) -> tuple[PartialFC, SparseHeadOptimizer]:
    # bf16 with stochastic rounding (the default) and r < 1: both the sampled set and the rounding noise
    # depend on head.step
    head = PartialFC(120, 32, 0.4, margin=MARGIN, scale=32.0, seed=seed, dtype=torch.bfloat16)
    return head, head.make_optimizer(lr=0.05, momentum=0.9, weight_decay=5e-4)


def _bits(head: PartialFC, opt: SparseHeadOptimizer) -> list[torch.Tensor]:
    return [t.detach().view(torch.int16).clone() for t in (head.weight, *opt.row_state().values())]


def test_a_resume_through_state_dict_continues_bit_identically() -> None:
    """3 steps, state_dict into a fresh head (and the optimizer's state_dict into its optimizer), one more
    step: the weights and the momentum are bit-identical to the 4th step of the uninterrupted run, and so
    is the 4th step's sampled set."""
    ref = _make()
    _steps(*ref, 0, 3)
    # copies: a state_dict's tensors share the live weights and momentum, which the 4th step changes
    head_sd, opt_sd = copy.deepcopy(ref[0].state_dict()), copy.deepcopy(ref[1].state_dict())
    assert head_sd["_extra_state"] == {"seed": 9, "step": 3}
    _steps(*ref, 3, 1)

    resumed = _make()
    resumed[0].load_state_dict(head_sd)  # strict
    resumed[1].load_state_dict(opt_sd)
    assert resumed[0].step == 3
    _steps(*resumed, 3, 1)
    ids_ref, ids_resumed = ref[0].sampled_class_ids(), resumed[0].sampled_class_ids()
    assert ids_ref is not None and ids_resumed is not None and torch.equal(ids_ref, ids_resumed)
    for want, got in zip(_bits(*ref), _bits(*resumed), strict=True):
        assert torch.equal(want, got)


def test_the_state_dict_restores_the_seed_as_load_head_does() -> None:
    """A head built with another seed continues the saved run's draws, as load_head makes it."""
    ref = _make(seed=9)
    _steps(*ref, 0, 2)
    other = _make(seed=4)
    other[0].load_state_dict(ref[0].state_dict())
    other[1].load_state_dict(copy.deepcopy(ref[1].state_dict()))  # else it would share ref's momentum
    assert (other[0].seed, other[0].step) == (9, 2)
    _steps(*ref, 2, 1)
    _steps(*other, 2, 1)
    for want, got in zip(_bits(*ref), _bits(*other), strict=True):
        assert torch.equal(want, got)


def test_a_state_dict_without_the_sampler_state_still_loads() -> None:
    """A state_dict saved before the sampler state was in it (no "_extra_state") loads, strict too, and
    leaves the head's own seed and step; one with it into a module holding the head under a prefix works."""
    src, _ = _make()
    _steps(src, src.make_optimizer(lr=0.05), 0, 2)
    old = {k: v for k, v in src.state_dict().items() if k != "_extra_state"}
    head, _ = _make(seed=5)
    head.step = 7
    head.load_state_dict(old, strict=True)
    assert torch.equal(head.weight, src.weight) and (head.seed, head.step) == (5, 7)

    outer = torch.nn.ModuleDict({"head": _make()[0]})
    outer.load_state_dict({f"head.{k}": v for k, v in old.items()})
    assert outer["head"].step == 0
    outer.load_state_dict({f"head.{k}": v for k, v in src.state_dict().items()})
    assert outer["head"].step == 2


def test_a_bad_sampler_state_is_refused() -> None:
    head, _ = _make()
    sd = head.state_dict()
    sd["_extra_state"] = {"step": 3}
    with pytest.raises(ValueError, match=r"'_extra_state' must hold 'seed' and 'step', got \{'step': 3\}"):
        head.load_state_dict(sd)
