"""DisplacementBasis, displacement_sum and DiscFaceLoss against an independent float64 transcription."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from discface import DiscFaceLoss, DisplacementBasis, MarginSoftmaxDiscFaceLoss, displacement_sum
from discface.basis import capped_basis


# ---- independent reference: Algorithm 1 written out in numpy float64, sample by sample ----------
def ref_xi(b: np.ndarray, cap: float) -> np.ndarray:
    nb = math.sqrt(float(np.dot(b, b)))
    return b / nb * min(nb, cap)


def ref_disc(f: np.ndarray, labels: np.ndarray, W: np.ndarray, b: np.ndarray, cap: float) -> float:
    xi = ref_xi(b, cap)
    total = 0.0
    for i in range(f.shape[0]):
        z = f[i] / math.sqrt(float(np.dot(f[i], f[i])))
        w = W[labels[i]] / math.sqrt(float(np.dot(W[labels[i]], W[labels[i]])))
        r = (z - w) - xi
        total += math.sqrt(float(np.dot(r, r)))
    return total / f.shape[0]


def _random_problem(seed: int, n: int = 7, d: int = 5, c: int = 4):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, d))
    W = rng.normal(size=(c, d))
    labels = rng.integers(0, c, size=n)
    return f, W, labels


# ---- DisplacementBasis ---------------------------------------------------------------------------
finite_b = arrays(np.float64, st.integers(1, 16),
                  elements=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False))


@settings(max_examples=200, deadline=None)
@given(b=finite_b, cap=st.floats(1e-4, 10.0))
def test_xi_norm_never_exceeds_cap(b: np.ndarray, cap: float) -> None:
    xi = capped_basis(torch.from_numpy(b), cap)
    assert torch.isfinite(xi).all()
    nb = float(np.linalg.norm(b))
    assert float(torch.linalg.vector_norm(xi)) <= cap * (1 + 1e-12)
    # and it equals the definition where the definition is defined
    if nb > 0:
        np.testing.assert_allclose(xi.numpy(), ref_xi(b, cap), rtol=1e-12, atol=1e-300)


def test_basis_init_nonzero_below_cap_and_seeded() -> None:
    a, b, c = DisplacementBasis(16, seed=3), DisplacementBasis(16, seed=3), DisplacementBasis(16, seed=4)
    assert torch.equal(a.b, b.b)           # every rank builds the same b from the seed
    assert not torch.equal(a.b, c.b)
    nb = float(a.b.detach().norm())
    assert 0 < nb < a.cap
    assert torch.allclose(a(), a.b)        # below the cap xi is b itself
    with pytest.raises(ValueError, match="init_scale"):
        DisplacementBasis(4, init_scale=0.0)
    with pytest.raises(ValueError, match="cap"):
        DisplacementBasis(4, cap=-1.0)


def test_gradient_at_init_is_nonzero_and_zero_at_origin() -> None:
    basis = DisplacementBasis(8, seed=0).double()
    target = torch.randn(8, dtype=torch.float64)
    (basis() - target).norm().backward()
    assert basis.b.grad is not None and float(basis.b.grad.norm()) > 1e-3
    # the reason for the non-zero init: at b = 0 nothing reaches b
    b0 = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    (capped_basis(b0, 0.05) - target).norm().backward()
    assert b0.grad is not None and float(b0.grad.abs().max()) == 0.0


# ---- displacement_sum / DiscFaceLoss vs the reference -------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("init_scale", [0.01, 0.2])   # below and above the cap
def test_discface_loss_matches_algorithm1(seed: int, init_scale: float) -> None:
    f, W, labels = _random_problem(seed)
    loss = DiscFaceLoss(f.shape[1], cap=0.05, init_scale=init_scale, seed=seed).double()
    got = loss(torch.from_numpy(f), torch.from_numpy(labels), torch.from_numpy(W)).detach()
    want = ref_disc(f, labels, W, loss.basis.b.detach().numpy(), 0.05)
    assert abs(float(got) - want) <= 1e-12 * abs(want)


def test_displacement_sum_matches_reference_and_handles_empty() -> None:
    f, W, labels = _random_problem(5, n=9)
    b = np.random.default_rng(9).normal(size=f.shape[1]) * 0.01
    z = torch.nn.functional.normalize(torch.from_numpy(f), dim=1)
    w = torch.nn.functional.normalize(torch.from_numpy(W), dim=1)[torch.from_numpy(labels)]
    xi = capped_basis(torch.from_numpy(b), 0.05)
    got = displacement_sum(z, w, xi)
    assert abs(float(got) - ref_disc(f, labels, W, b, 0.05) * f.shape[0]) <= 1e-12 * float(got)
    empty = displacement_sum(z[:0], w[:0], xi)
    assert float(empty) == 0.0 and empty.dim() == 0
    with pytest.raises(ValueError, match="xi must be"):
        displacement_sum(z, w, xi[:-1])
    with pytest.raises(ValueError, match="w_hat must match"):
        displacement_sum(z, w[:-1], xi)


def test_discface_loss_rejects_bad_labels() -> None:
    loss = DiscFaceLoss(4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        loss(torch.randn(2, 4), torch.tensor([0, 3]), torch.randn(3, 4))
    with pytest.raises(ValueError, match="weight must be"):
        loss(torch.randn(2, 4), torch.tensor([0, 1]), torch.randn(3, 5))


@pytest.mark.parametrize("init_scale", [0.01, 0.2])
def test_gradients_gradcheck_float64(init_scale: float) -> None:
    f, W, labels = _random_problem(11, n=6, d=4, c=3)
    lab = torch.from_numpy(labels)
    b0 = DisplacementBasis(4, cap=0.05, init_scale=init_scale, seed=1).b.detach().double()

    def fn(f_, W_, b_):
        z = torch.nn.functional.normalize(f_, dim=1)
        w = torch.nn.functional.normalize(W_, dim=1)[lab]
        return displacement_sum(z, w, capped_basis(b_, 0.05)) / f_.shape[0]

    inputs = (torch.from_numpy(f).clone().requires_grad_(True),
              torch.from_numpy(W).clone().requires_grad_(True), b0.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)

    # and the module's gradients are the same function's gradients (z, w_y and b all reached)
    loss = DiscFaceLoss(4, cap=0.05, init_scale=init_scale, seed=1).double()
    fm = torch.from_numpy(f).clone().requires_grad_(True)
    Wm = torch.from_numpy(W).clone().requires_grad_(True)
    loss(fm, lab, Wm).backward()
    gf, gW, gb = torch.autograd.grad(fn(*inputs), inputs)
    for got, want in ((fm.grad, gf), (Wm.grad, gW), (loss.basis.b.grad, gb)):
        assert got is not None
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert float(gb.abs().max()) > 0
    # rows of W whose class is absent from the batch get no gradient
    absent = sorted(set(range(3)) - set(labels.tolist()))
    for c in absent:
        assert float(Wm.grad[c].abs().max()) == 0.0


def test_b_moves_under_sgd_and_xi_stays_capped() -> None:
    torch.manual_seed(0)
    n_cls, d = 6, 8
    model = MarginSoftmaxDiscFaceLoss(n_cls, d, discface_lambda=1.0, seed=0)
    feats = torch.nn.Parameter(torch.randn(48, d))
    labels = torch.arange(48) % n_cls
    b_init = model.disc.basis.b.detach().clone()
    opt = torch.optim.SGD([*model.parameters(), feats], lr=0.5)
    norms = []
    for _ in range(15):
        opt.zero_grad()
        terms = model(feats, labels)
        terms.total.backward()
        opt.step()
        norms.append(float(model.disc.xi.detach().norm()))
    moved = float((model.disc.basis.b.detach() - b_init).norm())
    assert moved > 1e-3, f"b moved only {moved}"
    assert max(norms) <= 0.05 * (1 + 1e-6)
    assert torch.isfinite(terms.total.detach()) and float(terms.disc.detach()) > 0


# ---- the single-process margin softmax helper ----------------------------------------------------
def ref_margin_ce(f: np.ndarray, labels: np.ndarray, W: np.ndarray, margin, s: float) -> float:
    m1, m2, m3 = margin
    total = 0.0
    for i in range(f.shape[0]):
        z = f[i] / np.linalg.norm(f[i])
        logits = []
        for j in range(W.shape[0]):
            c = float(z @ (W[j] / np.linalg.norm(W[j])))
            if j == labels[i]:
                theta = math.acos(c)
                # past pi: the continuous extension cos - (1 + cos(theta_s)), m1 theta_s + m2 = pi
                c = (math.cos(m1 * theta + m2) if m1 * theta + m2 <= math.pi
                     else c - 1 - math.cos((math.pi - m2) / m1)) - m3
            logits.append(s * c)
        mx = max(logits)
        lse = mx + math.log(sum(math.exp(v - mx) for v in logits))
        total += lse - logits[labels[i]]
    return total / f.shape[0]


@pytest.mark.parametrize("margin", [(1.0, 0.0, 0.4), (1.0, 0.5, 0.0), (1.0, 2.9, 0.0), (1.35, 0.0, 0.0),
                                    (0.8, 0.3, 0.1)])
def test_margin_softmax_matches_reference_and_gradcheck(margin) -> None:
    from discface import margin_softmax_loss

    f, W, labels = _random_problem(21, n=6, d=4, c=5)
    lab = torch.from_numpy(labels)
    ft = torch.from_numpy(f).clone().requires_grad_(True)
    Wt = torch.from_numpy(W).clone().requires_grad_(True)
    got = margin_softmax_loss(ft, lab, Wt, margin, 8.0)
    want = ref_margin_ce(f, labels, W, margin, 8.0)
    assert abs(float(got.detach()) - want) <= 1e-10 * abs(want)
    # m2 = 2.9 drives most targets past pi: the fallback branch is exercised too
    assert torch.autograd.gradcheck(lambda a, b: margin_softmax_loss(a, lab, b, margin, 8.0), (ft, Wt),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)
