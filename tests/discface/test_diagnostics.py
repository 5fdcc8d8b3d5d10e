"""Discrepancy diagnostics on constructed cases whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from discface import discrepancy_stats, heldout_discrepancy


def _sphere(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64),
                       dim=1)


def test_identical_displacements_give_zero() -> None:
    d, k, per = 6, 4, 5
    w = _sphere(k, d, 0)
    labels = torch.arange(k).repeat_interleave(per)
    delta = 0.1 * _sphere(1, d, 1)[0]
    eps = delta.expand(k * per, d)
    z = w[labels] + eps                    # z need not be unit here: the stats only see z - w
    s = discrepancy_stats(z, w[labels], labels, xi=delta)
    assert s["directional_deg"] == pytest.approx(0.0, abs=1e-5)
    assert s["directional_circvar"] == pytest.approx(0.0, abs=1e-12)
    assert s["radial_std"] == pytest.approx(0.0, abs=1e-12)
    assert s["radial_cv"] == pytest.approx(0.0, abs=1e-12)
    assert s["xi_angle_deg"] == pytest.approx(0.0, abs=1e-5)
    assert s["eps_norm_mean"] == pytest.approx(0.1, rel=1e-12)
    assert s["num_classes"] == k and s["num_samples"] == k * per


def test_opposite_displacements_are_large() -> None:
    d = 5
    w = _sphere(2, d, 3)
    u = F.normalize(torch.randn(d, dtype=torch.float64), dim=0)
    # class 0: +u, -u, -u -> mean along -u; angles 180, 0, 0 -> 60 deg; class 1: +u, -u -> mean 0 -> 90 deg
    eps = torch.stack([u, -u, -u, u, -u]) * 0.2
    labels = torch.tensor([0, 0, 0, 1, 1])
    s = discrepancy_stats(w[labels] + eps, w[labels], labels)
    assert s["directional_deg"] == pytest.approx((60.0 + 90.0) / 2, abs=1e-6)
    assert s["directional_circvar"] == pytest.approx(((1 - 1 / 3) + 1.0) / 2, abs=1e-12)
    assert s["radial_std"] == pytest.approx(0.0, abs=1e-12)   # same length, only direction differs
    assert math.isnan(s["xi_angle_deg"])


def test_radial_spread_known_values() -> None:
    d = 4
    w = _sphere(1, d, 5)
    u = F.normalize(torch.randn(d, dtype=torch.float64), dim=0)
    lengths = torch.tensor([0.1, 0.2, 0.3, 0.6], dtype=torch.float64)
    labels = torch.zeros(4, dtype=torch.long)
    s = discrepancy_stats(w[labels] + lengths[:, None] * u, w[labels], labels)
    std = float(lengths.std(unbiased=False))
    assert s["radial_std"] == pytest.approx(std, rel=1e-12)
    assert s["radial_cv"] == pytest.approx(std / float(lengths.mean()), rel=1e-12)
    assert s["directional_deg"] == pytest.approx(0.0, abs=1e-5)


def test_singletons_excluded_and_labels_arbitrary() -> None:
    d = 3
    z, w = _sphere(5, d, 7), _sphere(5, d, 8)
    # classes 1000 (4 samples) and -7 (singleton): only 1000 is averaged
    labels = torch.tensor([1000, 1000, -7, 1000, 1000])
    s = discrepancy_stats(z, w, labels)
    keep = labels == 1000
    s_only = discrepancy_stats(z[keep], w[keep], labels[keep])
    assert s["num_classes"] == 1
    for key in ("directional_deg", "radial_std", "radial_cv", "directional_circvar"):
        assert s[key] == pytest.approx(s_only[key], rel=1e-12)
    empty = discrepancy_stats(z[:0], w[:0], labels[:0])
    assert math.isnan(empty["directional_deg"]) and empty["num_samples"] == 0


def test_per_class_average_matches_loop_reference() -> None:
    d, n = 6, 40
    z = _sphere(n, d, 10)
    labels = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(2))
    w_cls = _sphere(5, d, 11)
    s = discrepancy_stats(z, w_cls[labels], labels)
    dirs, stds = [], []
    for c in labels.unique():
        e = (z - w_cls[labels])[labels == c]
        if len(e) < 2:
            continue
        m = e.mean(0)
        cosines = [float(ei @ m / (ei.norm() * m.norm())) for ei in e]
        ang = [math.degrees(math.acos(max(-1.0, min(1.0, c)))) for c in cosines]
        dirs.append(sum(ang) / len(ang))
        stds.append(float(e.norm(dim=1).std(unbiased=False)))
    assert s["directional_deg"] == pytest.approx(sum(dirs) / len(dirs), rel=1e-9)
    assert s["radial_std"] == pytest.approx(sum(stds) / len(stds), rel=1e-12)


def test_heldout_uses_class_mean_or_given_centres() -> None:
    d, per = 8, 6
    centres = _sphere(3, d, 12)
    labels = torch.arange(3).repeat_interleave(per)
    delta = 0.05 * _sphere(1, d, 13)[0]
    feats = 3.0 * F.normalize(centres[labels] + delta, dim=1)   # unnormalised input, one shared offset
    given = heldout_discrepancy(feats, labels, centres=centres)
    assert given["directional_deg"] == pytest.approx(0.0, abs=1e-5)
    assert given["radial_std"] == pytest.approx(0.0, abs=1e-12)
    # without centres each class collapses onto its own mean: the displacement vanishes
    own = heldout_discrepancy(feats, labels)
    assert own["eps_norm_mean"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="labels must index centres"):
        heldout_discrepancy(feats, labels + 5, centres=centres)


def test_per_rank_results_combine_exactly() -> None:
    # classes partitioned by owner (as the sharded head does): the num_classes-weighted mean of the
    # per-rank numbers is the whole batch's number
    d, n = 5, 60
    z = _sphere(n, d, 20)
    labels = torch.randint(0, 9, (n,), generator=torch.Generator().manual_seed(3))
    w = _sphere(9, d, 21)[labels]
    xi = 0.05 * _sphere(1, d, 22)[0]
    full = discrepancy_stats(z, w, labels, xi)
    parts = [discrepancy_stats(z[m], w[m], labels[m], xi) for m in (labels < 4, labels >= 4)]
    k = sum(p["num_classes"] for p in parts)
    assert k == full["num_classes"]
    for key in ("directional_deg", "directional_circvar", "radial_std", "radial_cv", "xi_angle_deg"):
        combined = sum(p["num_classes"] * p[key] for p in parts) / k
        assert combined == pytest.approx(full[key], rel=1e-12)
