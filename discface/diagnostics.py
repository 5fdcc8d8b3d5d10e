"""Directional and radial discrepancy of displacement vectors (the two discrepancies DiscFace names).

For samples i with L2-normalised feature z_i and normalised class weight w_i of their class, the
displacement is eps_i = z_i - w_i. Per class c with samples S_c:

- directional: the mean angle between each eps_i and the class's mean displacement m_c = mean eps_i
  (0 when all of a class's displacements point the same way). Also reported: the circular variance
  1 - ||mean_i unit(eps_i)|| (0 = aligned, 1 = cancelling), which stays well defined when m_c ~ 0.
- radial: the spread of ||eps_i|| within the class: its standard deviation (population, ddof = 0) and
  its coefficient of variation std / mean.
- xi alignment (when xi is given): the angle between m_c and xi.

Each per-class number is averaged over classes with at least two samples (a singleton has no spread),
so every class counts once regardless of its size. Everything is one pass of ``index_add_`` /
``bincount`` over the samples: cheap enough to run on a rank's owned samples every k steps.

Across ranks: a class's samples are all owned by one rank (the owner of its weight row), so the
per-class values each rank computes are complete. The global class average of a statistic is
sum_k num_classes_k * stat_k / sum_k num_classes_k over ranks with num_classes_k > 0 (``eps_norm_mean``
is a sample average: weight it by ``num_samples``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DISCREPANCY_KEYS", "discrepancy_stats", "heldout_discrepancy"]

_KEYS = ("directional_deg", "directional_circvar", "radial_std", "radial_cv", "eps_norm_mean",
         "xi_angle_deg", "num_classes", "num_samples")


def _angle_deg(cos: Tensor) -> Tensor:
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


@torch.no_grad()
def discrepancy_stats(z_hat: Tensor, w_hat: Tensor, labels: Tensor,
                      xi: Tensor | None = None) -> dict[str, float]:
    """Discrepancy statistics of the displacements eps = z_hat - w_hat, grouped by ``labels``.

    Args:
        z_hat: (n, d) L2-normalised features (any subset of samples, e.g. the ones a rank owns).
        w_hat: (n, d) L2-normalised class weight (or class centre) of each sample's class.
        labels: (n,) integer class of each sample; any integer values (they are only grouped).
        xi: optional (d,) displacement basis, for the class-mean-to-xi angle.

    Returns:
        floats: ``directional_deg`` (mean angle of eps to its class mean displacement, degrees),
        ``directional_circvar`` (1 - mean resultant length of unit(eps), in [0, 1]), ``radial_std``,
        ``radial_cv`` (std / mean of ||eps|| within a class), ``eps_norm_mean``, ``xi_angle_deg``
        (NaN without xi), ``num_classes`` (classes with >= 2 samples, the ones averaged) and
        ``num_samples``. With no class of >= 2 samples the statistics are NaN.
    """
    if z_hat.dim() != 2 or w_hat.shape != z_hat.shape:
        raise ValueError(f"z_hat and w_hat must both be (n, d); got {tuple(z_hat.shape)} and "
                         f"{tuple(w_hat.shape)}")
    if labels.shape != (z_hat.shape[0],):
        raise ValueError(f"labels must be ({z_hat.shape[0]},), got shape {tuple(labels.shape)}")
    if xi is not None and xi.shape != (z_hat.shape[1],):
        raise ValueError(f"xi must be ({z_hat.shape[1]},), got shape {tuple(xi.shape)}")
    # float64 accumulation: class sums of many nearly-cancelling vectors lose digits in fp16/fp32
    eps = (z_hat.double() - w_hat.double())
    n = eps.shape[0]
    nan = float("nan")
    out: dict[str, float] = dict.fromkeys(_KEYS, nan)
    out["num_samples"] = float(n)
    out["num_classes"] = 0.0
    if n == 0:
        return out
    uniq, inv = torch.unique(labels, return_inverse=True)
    k = uniq.shape[0]
    counts = torch.bincount(inv, minlength=k).to(eps.dtype)                      # (k,)
    norms = torch.linalg.vector_norm(eps, dim=1)                                 # (n,)

    sums = eps.new_zeros(k, eps.shape[1]).index_add_(0, inv, eps)
    mean_disp = sums / counts[:, None]                                           # (k, d)
    # angle of each eps to its class mean; normalize() maps a zero vector to 0, i.e. cos 0 -> 90 deg,
    # which is the honest answer for "no common direction"
    cos_to_mean = (F.normalize(eps, dim=1) * F.normalize(mean_disp, dim=1)[inv]).sum(1)
    ang_sum = eps.new_zeros(k).index_add_(0, inv, _angle_deg(cos_to_mean))
    unit_sum = eps.new_zeros(k, eps.shape[1]).index_add_(0, inv, F.normalize(eps, dim=1))
    circvar = 1.0 - torch.linalg.vector_norm(unit_sum, dim=1) / counts

    norm_sum = eps.new_zeros(k).index_add_(0, inv, norms)
    norm_mean = norm_sum / counts
    sq_dev = eps.new_zeros(k).index_add_(0, inv, (norms - norm_mean[inv]) ** 2)
    radial_std = torch.sqrt(sq_dev / counts)
    # a class sitting exactly on its weight has mean 0 and std 0: its cv is 0, not 0/0
    radial_cv = torch.where(norm_mean > 0, radial_std / norm_mean.clamp_min(1e-300),
                            torch.zeros_like(norm_mean))

    keep = counts >= 2
    out["num_classes"] = float(keep.sum())
    out["eps_norm_mean"] = float(norms.mean())
    if not bool(keep.any()):
        return out
    out["directional_deg"] = float((ang_sum / counts)[keep].mean())
    out["directional_circvar"] = float(circvar[keep].clamp_min(0.0).mean())
    out["radial_std"] = float(radial_std[keep].mean())
    out["radial_cv"] = float(radial_cv[keep].mean())
    if xi is not None:
        cos_xi = F.normalize(mean_disp[keep], dim=1) @ F.normalize(xi.double(), dim=0)
        out["xi_angle_deg"] = float(_angle_deg(cos_xi).mean())
    return out


@torch.no_grad()
def heldout_discrepancy(embeddings: Tensor, labels: Tensor, centres: Tensor | None = None,
                        xi: Tensor | None = None) -> dict[str, float]:
    """Discrepancy statistics on held-out data, where there may be no class weights.

    Args:
        embeddings: (n, d) raw or normalised features (normalised here).
        labels: (n,) integer identity of each sample.
        centres: optional (C, d) class weights indexed by label (e.g. a trained head's rows for its own
            identities). Without them, each identity's centre is its normalised mean feature, the
            natural stand-in for an unseen identity's class weight.
        xi: optional (d,) basis for the class-mean-to-xi angle.

    Caveat: with centres estimated from the same samples, each class's mean displacement is
    radial by construction (mean z minus its own direction), so ``directional_deg`` then measures the
    tangential scatter rather than agreement with a learned xi; compare such numbers between runs
    (e.g. lambda = 0 versus lambda > 0 on the same identities), not with training-time values.
    """
    if embeddings.dim() != 2 or labels.shape != (embeddings.shape[0],):
        raise ValueError(f"embeddings must be (n, d) and labels (n,); got {tuple(embeddings.shape)} "
                         f"and {tuple(labels.shape)}")
    z_hat = F.normalize(embeddings.double(), dim=1)
    if centres is None:
        uniq, inv = torch.unique(labels, return_inverse=True)
        sums = z_hat.new_zeros(len(uniq), z_hat.shape[1]).index_add_(0, inv, z_hat)
        w_hat = F.normalize(sums, dim=1)[inv]
    else:
        if centres.dim() != 2 or centres.shape[1] != embeddings.shape[1]:
            raise ValueError(f"centres must be (C, {embeddings.shape[1]}), got {tuple(centres.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= centres.shape[0]):
            raise ValueError(f"labels must index centres: expected [0, {centres.shape[0]}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        w_hat = F.normalize(centres.double(), dim=1)[labels]
    return discrepancy_stats(z_hat, w_hat, labels, xi=xi)


# the module-level constant keeps the key set discoverable for exporters (Prometheus gauges)
DISCREPANCY_KEYS: tuple[str, ...] = _KEYS
