"""Verification metrics on constructed data with known answers, and against sklearn / brute force."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from partialfc.metrics import (
    best_threshold,
    flip_embed,
    kfold_accuracy,
    pair_scores,
    split_pairs,
    verification_metrics,
)


def pairs_with_scores(scores: np.ndarray, d: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random pairs whose cosine similarity is exactly ``scores`` (up to rounding), random lengths."""
    rng = np.random.default_rng(seed)
    p = scores.shape[0]
    a = rng.normal(size=(p, d))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    r = rng.normal(size=(p, d))
    r -= np.sum(r * a, axis=1, keepdims=True) * a           # orthogonal to a
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    b = scores[:, None] * a + np.sqrt(1 - scores[:, None] ** 2) * r
    # arbitrary positive lengths: the metrics must normalise
    return a * rng.uniform(0.5, 3, (p, 1)), b * rng.uniform(0.5, 3, (p, 1))


def brute_kfold(scores: np.ndarray, same: np.ndarray, n_folds: int = 10) -> np.ndarray:
    """Independent reference: contiguous folds, try every midpoint (and both extremes) as threshold."""
    n = len(scores)
    bounds = np.array_split(np.arange(n), n_folds)
    accs = []
    for test in bounds:
        train = np.setdiff1d(np.arange(n), test)
        u = np.unique(scores[train])
        cands = np.concatenate([[u[0] - 1], (u[1:] + u[:-1]) / 2, [u[-1] + 1]])
        tr_acc = [np.mean((scores[train] >= t) == same[train]) for t in cands]
        best = max(tr_acc)
        # among equally good training thresholds the reported test accuracy may differ; take the highest t,
        # as the implementation documents
        t = max(c for c, a in zip(cands, tr_acc, strict=True) if a == best)
        accs.append(np.mean((scores[test] >= t) == same[test]))
    return np.array(accs)


def brute_tar(scores: np.ndarray, same: np.ndarray, far: float) -> float:
    gen, imp = scores[same], scores[~same]
    best = 0.0
    for t in np.concatenate([np.unique(scores), [np.inf]]):
        if np.mean(imp >= t) <= far:
            best = max(best, float(np.mean(gen >= t)))
    return best


def test_separable_pairs_are_perfect() -> None:
    rng = np.random.default_rng(1)
    same = np.tile([True, False], 1000)
    scores = np.where(same, rng.uniform(0.6, 0.95, same.size), rng.uniform(-0.3, 0.4, same.size))
    e1, e2 = pairs_with_scores(scores)
    m = verification_metrics(e1, e2, same)
    assert m["accuracy"] == 1.0 and m["accuracy_std"] == 0.0
    assert 0.4 < m["best_threshold"] < 0.6
    assert m["auc"] == 1.0
    assert m["tar_at_far"]["1e-3"] == 1.0 and m["tar_at_far"]["1e-2"] == 1.0
    assert m["tar_at_far"]["1e-4"] is None          # 1000 impostors cannot show FAR = 1e-4
    assert any("1e-4" in note and "1000" in note for note in m["notes"])
    json.dumps(m, allow_nan=False)                   # JSON-ready as returned


def test_known_accuracy_with_unrecoverable_errors() -> None:
    # each of the 10 folds: 9 clean genuines, 9 clean impostors, 1 genuine scored low, 1 impostor high
    fold_scores = np.concatenate([np.linspace(0.55, 0.95, 9), np.linspace(-0.2, 0.35, 9), [0.0], [0.9]])
    fold_same = np.array([True] * 9 + [False] * 9 + [True, False])
    scores, same = np.tile(fold_scores, 10), np.tile(fold_same, 10)
    e1, e2 = pairs_with_scores(scores, seed=2)
    m = verification_metrics(e1, e2, same)
    assert m["accuracy"] == pytest.approx(18 / 20, abs=1e-12)
    assert m["accuracy_std"] == pytest.approx(0.0, abs=1e-12)
    assert 0.35 < m["best_threshold"] < 0.55


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kfold_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    same = rng.random(n) < 0.5
    scores = np.round(np.where(same, rng.normal(0.5, 0.2, n), rng.normal(0.2, 0.2, n)), 2)  # with ties
    accs, _ = kfold_accuracy(scores, same, protocol="best_cut")
    np.testing.assert_allclose(accs, brute_kfold(scores, same), atol=1e-12)


def insightface_kfold(e1: np.ndarray, e2: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """insightface's ``verification.py`` ``calculate_roc`` accuracy, its logic as written there: normalised
    embeddings, squared distance, for each of 10 KFold folds every threshold of ``np.arange(0, 4, 0.01)``
    tried on the training folds with ``dist < t``, the first argmax applied to the test fold."""
    from sklearn.model_selection import KFold

    a = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    b = e2 / np.linalg.norm(e2, axis=1, keepdims=True)
    dist = np.sum(np.square(a - b), 1)
    thresholds = np.arange(0, 4, 0.01)

    def accuracy(t: float, d: np.ndarray, y: np.ndarray) -> float:
        pred = np.less(d, t)
        tp = np.sum(np.logical_and(pred, y))
        tn = np.sum(np.logical_and(np.logical_not(pred), np.logical_not(y)))
        return float(tp + tn) / d.size

    accs, ths = [], []
    for train, test in KFold(n_splits=10, shuffle=False).split(np.arange(len(same))):
        acc_train = np.array([accuracy(t, dist[train], same[train]) for t in thresholds])
        best = int(np.argmax(acc_train))
        accs.append(accuracy(thresholds[best], dist[test], same[test]))
        ths.append(thresholds[best])
    return np.array(accs), np.array(ths)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_accuracy_is_insightfaces_protocol(seed: int) -> None:
    """The reported accuracy is the number insightface's own evaluation gives (its threshold grid on
    squared distance, not the exact best cut, which differs by a pair or two per fold): comparable with
    published LFW / CFP / AgeDB figures."""
    rng = np.random.default_rng(seed)
    n = 6000
    same = np.tile([True, False], n // 2)
    scores = np.clip(np.where(same, rng.normal(0.55, 0.15, n), rng.normal(0.1, 0.15, n)), -0.99, 0.99)
    e1, e2 = pairs_with_scores(scores, seed=seed)
    want, t = insightface_kfold(e1, e2, same)
    m = verification_metrics(e1, e2, same)
    np.testing.assert_allclose(m["fold_accuracies"], want, atol=1e-12)
    assert m["accuracy"] == pytest.approx(float(want.mean()), abs=1e-12)
    assert m["best_threshold"] == pytest.approx(float(np.mean(1 - t / 2)), abs=1e-12)


def test_best_threshold_exact_and_ties() -> None:
    scores = np.array([0.9, 0.8, 0.8, 0.3, 0.1])
    same = np.array([True, True, False, False, False])
    t, acc = best_threshold(scores, same)
    assert acc == pytest.approx(4 / 5) and t > 0.8      # the tie at 0.8 can't be split; 0.9 alone wins
    t2, acc2 = best_threshold(np.array([0.2, 0.1]), np.array([False, False]))
    assert acc2 == 1.0 and t2 > 0.2


def test_known_tar_at_far() -> None:
    imp = np.linspace(-0.5, 0.5, 10_000)                 # distinct; top-10 and top-100 cut points known
    gen = np.concatenate([np.full(50, 0.8),               # above every impostor
                          np.linspace(imp[-99], imp[-11], 30),   # accepted at FAR 1e-2 only
                          np.full(20, 0.1)])
    scores = np.concatenate([gen, imp])
    same = np.concatenate([np.ones(gen.size, bool), np.zeros(imp.size, bool)])
    e1, e2 = pairs_with_scores(scores, seed=3)
    m = verification_metrics(e1, e2, same)
    assert m["tar_at_far"]["1e-4"] == pytest.approx(0.5)
    assert m["tar_at_far"]["1e-3"] == pytest.approx(0.5)
    assert m["tar_at_far"]["1e-2"] == pytest.approx(0.8)
    assert m["notes"] == []


@pytest.mark.parametrize("seed", [4, 5])
def test_tar_and_auc_against_sklearn_and_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 3000
    same = rng.random(n) < 0.3
    scores = np.clip(np.where(same, rng.normal(0.45, 0.2, n), rng.normal(0.0, 0.15, n)), -0.99, 0.99)
    e1, e2 = pairs_with_scores(scores, seed=seed)
    m = verification_metrics(torch.from_numpy(e1).float(), torch.from_numpy(e2).float(), torch.from_numpy(same))
    s64 = pair_scores(e1, e2)
    s32 = pair_scores(torch.from_numpy(e1).float(), torch.from_numpy(e2).float())
    assert m["auc"] == pytest.approx(roc_auc_score(same, s32), abs=1e-12)
    assert m["auc"] == pytest.approx(roc_auc_score(same, s64), abs=1e-3)
    for key, far in (("1e-3", 1e-3), ("1e-2", 1e-2)):
        assert m["tar_at_far"][key] == pytest.approx(brute_tar(s32, same, far), abs=1e-12)
    assert m["num_pairs"] == n and m["num_genuine"] == int(same.sum())


def test_roc_png_written(tmp_path) -> None:
    rng = np.random.default_rng(7)
    same = rng.random(400) < 0.5
    scores = np.where(same, rng.normal(0.5, 0.2, 400), rng.normal(0.1, 0.2, 400)).clip(-0.99, 0.99)
    e1, e2 = pairs_with_scores(scores)
    m = verification_metrics(e1, e2, same, roc_png=tmp_path / "sub" / "roc.png", name="synthetic")
    png = tmp_path / "sub" / "roc.png"
    assert m["roc_png"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_bad_input_errors() -> None:
    e = np.ones((20, 4))
    with pytest.raises(ValueError, match="both genuine and impostor"):
        verification_metrics(e, e, np.ones(20, bool))
    with pytest.raises(ValueError, match="one entry per pair"):
        verification_metrics(e, e, np.ones(19, bool))
    with pytest.raises(ValueError, match="odd count"):
        split_pairs(np.ones((5, 4)))
    z = e.copy()
    z[3] = 0
    with pytest.raises(ValueError, match="emb2 row 3 is all zeros"):
        pair_scores(e, z)
    with pytest.raises(ValueError, match="at least 10 pairs"):
        verification_metrics(e[:6], e[:6], np.array([True, False] * 3))


class _Lin(torch.nn.Module):
    """A flip-sensitive toy embedder with a BatchNorm, so eval mode matters."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(3)
        self.fc = torch.nn.Linear(3 * 4 * 5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x).flatten(1))


def test_flip_embed_matches_definition() -> None:
    torch.manual_seed(0)
    model = _Lin()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    model.train()
    x = torch.randn(11, 3, 4, 5)
    got = flip_embed(model, x, batch_size=4)
    assert model.training                                # mode restored
    m64 = _Lin().double()
    m64.load_state_dict(model.state_dict())
    m64.eval()
    xd = x.double()
    with torch.no_grad():
        want = torch.nn.functional.normalize(m64(xd) + m64(xd.flip(3)), dim=1)
        no_flip = torch.nn.functional.normalize(m64(xd), dim=1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert got.dtype == torch.float32 and got.device == x.device
    torch.testing.assert_close(flip_embed(model, x, batch_size=100), got)
    # the flip matters for this model: without it the result differs
    assert float((no_flip - want).abs().max()) > 1e-3
    first, second = split_pairs(got[:10])
    np.testing.assert_array_equal(first, got[0:10:2].double().numpy())
    np.testing.assert_array_equal(second, got[1:10:2].double().numpy())
    with pytest.raises(ValueError, match="N, C, H, W"):
        flip_embed(model, x[0])
