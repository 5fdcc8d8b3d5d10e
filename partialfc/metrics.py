"""Face-verification metrics for pairs of embeddings (what `pfc eval` reports).

Protocol (as insightface's ``verification.py``, so that accuracies compare with published ones): pairs
are scored by cosine similarity of L2-normalised embeddings; accuracy is 10-fold
(``sklearn.model_selection.KFold``, pair order kept, no shuffle), each held-out fold judged at the
threshold that maximises accuracy on the 9 training folds, found as insightface finds it: "same iff the
squared distance 2 - 2 cos < t" over its grid ``t = 0, 0.01, ..., 3.99``, the first best t (reported as
the cosine 1 - t / 2); mean and std over folds. (The exact best cut of :func:`best_threshold` can differ
from the grid's by a pair or two per fold, 0.01-0.3 pp of accuracy: ``kfold_accuracy(...,
protocol="best_cut")``.) The ROC comes from ``sklearn.metrics.roc_curve`` on all pairs; TAR at a FAR target is
the largest TPR among ROC points whose FPR <= target (no interpolation between points, which would
claim operating points no threshold achieves). When there are fewer than 1 / FAR impostor pairs, no
threshold can show that FAR, and the TAR is reported as ``None`` with a note. Neither is an insightface
figure, and both differ from it on purpose: its ``verification.py`` also computes a 10-fold VAL@FAR=1e-3
(threshold interpolated on each training fold, over a 0.001 grid) that arcface_torch never reports, and
its IJB evaluation takes the ROC point *nearest* the target FAR, which may lie above it; ours never claims
a FAR above the target.

Embeddings may be numpy arrays or torch tensors (any device/dtype); everything here runs in numpy
float64 on the CPU. ``flip_embed`` computes the embeddings themselves (torch, on the input's device).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import roc_curve
from sklearn.model_selection import KFold

__all__ = ["FAR_TARGETS", "INSIGHTFACE_GRID", "best_threshold", "flip_embed", "grid_threshold", "kfold_accuracy",
           "pair_scores", "plot_roc", "roc_points", "split_pairs", "tar_at_far", "verification_metrics"]

# key -> FAR value; the keys are the JSON keys the acceptance checks read
FAR_TARGETS: dict[str, float] = {"1e-4": 1e-4, "1e-3": 1e-3, "1e-2": 1e-2}

ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]


def _as_f64(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (pairs, embedding_size), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        bad = int(np.argwhere(~np.isfinite(arr))[0][0])
        raise ValueError(f"{name} has non-finite values (first in row {bad})")
    return arr


def _as_bool(issame: ArrayLike, n: int) -> np.ndarray:
    if isinstance(issame, torch.Tensor):
        issame = issame.detach().cpu().numpy()
    arr = np.asarray(issame)
    if arr.shape != (n,):
        raise ValueError(f"issame must have one entry per pair ({n},), got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError("issame must be booleans (or 0/1)")
        arr = arr.astype(bool)
    return arr


def split_pairs(embeddings: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Split the embeddings of a ``.bin`` set's 2P images (pair i = images 2i, 2i+1) into (emb1, emb2)."""
    e = _as_f64(embeddings, "embeddings")
    if e.shape[0] % 2:
        raise ValueError(f"a verification set holds 2 images per pair; got an odd count {e.shape[0]}")
    return e[0::2], e[1::2]


def pair_scores(emb1: ArrayLike, emb2: ArrayLike) -> np.ndarray:
    """Cosine similarity of each pair, shape (P,), after L2-normalising both sides (float64)."""
    a, b = _as_f64(emb1, "emb1"), _as_f64(emb2, "emb2")
    if a.shape != b.shape:
        raise ValueError(f"emb1 and emb2 must have the same shape, got {a.shape} and {b.shape}")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    for name, nrm in (("emb1", na), ("emb2", nb)):
        if (nrm == 0).any():
            raise ValueError(f"{name} row {int(np.argmax(nrm == 0))} is all zeros: cannot be normalised")
    return np.einsum("ij,ij->i", a / na[:, None], b / nb[:, None])


def best_threshold(scores: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """The threshold t maximising accuracy of "same iff score >= t" on these pairs, and that accuracy.

    Exact over all distinct cuts (not a grid): scores sorted once, accuracy of every cut from cumulative
    counts. t is placed midway between the lowest accepted and the highest rejected score, so it
    transfers to unseen pairs without sitting on a training score. Ties in accuracy go to the highest t.
    """
    n = scores.shape[0]
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], issame[order]
    tp = np.cumsum(y)                              # genuine pairs accepted when cutting after index j
    fp = np.arange(1, n + 1) - tp
    n_neg = n - int(y.sum())
    # a cut after j is only possible where the next score is strictly lower (ties move together)
    last_of_tie = np.append(s[1:] < s[:-1], True)
    acc = np.where(last_of_tie, (tp + (n_neg - fp)) / n, -1.0)
    j = int(np.argmax(acc))
    none_acc = n_neg / n                           # threshold above every score: reject all
    if none_acc >= acc[j]:
        return float(s[0] + 1e-6), float(none_acc)
    t = float((s[j] + s[j + 1]) / 2) if j + 1 < n else float(s[j] - 1e-6)
    return t, float(acc[j])


#: insightface's threshold grid (``verification.py``): squared distances between unit embeddings, 0 to 4.
INSIGHTFACE_GRID = np.arange(0, 4, 0.01)


def grid_threshold(dist: np.ndarray, issame: np.ndarray, grid: np.ndarray = INSIGHTFACE_GRID) -> tuple[float, float]:
    """insightface's threshold search: the first t of ``grid`` maximising the accuracy of "same iff
    dist < t" on these pairs, and that accuracy. Counted from sorted distances (one searchsorted for the
    whole grid) rather than insightface's loop over the grid: the same numbers."""
    order = np.argsort(dist, kind="stable")
    ds, ys = dist[order], issame[order]
    genuine_below = np.concatenate([[0], np.cumsum(ys)])
    below = np.searchsorted(ds, grid, side="left")  # pairs with dist < t
    tp = genuine_below[below]
    tn = (ds.shape[0] - int(ys.sum())) - (below - tp)
    acc = (tp + tn) / ds.shape[0]
    j = int(np.argmax(acc))
    return float(grid[j]), float(acc[j])


def kfold_accuracy(scores: np.ndarray, issame: np.ndarray, n_folds: int = 10,
                   protocol: Literal["insightface", "best_cut"] = "insightface") -> tuple[np.ndarray, np.ndarray]:
    """Per-fold accuracy and cosine threshold: each fold is judged at the best threshold of the other folds,
    found on insightface's grid (see the module docstring) or, with ``protocol="best_cut"``, exactly
    (:func:`best_threshold`)."""
    if scores.shape[0] < n_folds:
        raise ValueError(f"{n_folds}-fold accuracy needs at least {n_folds} pairs, got {scores.shape[0]}")
    dist = 2.0 - 2.0 * scores  # the squared distance between the unit embeddings
    accs, ths = np.zeros(n_folds), np.zeros(n_folds)
    for k, (train, test) in enumerate(KFold(n_splits=n_folds, shuffle=False).split(scores)):
        if protocol == "insightface":
            t, _ = grid_threshold(dist[train], issame[train])
            ths[k] = 1.0 - t / 2.0
            accs[k] = float(np.mean((dist[test] < t) == issame[test]))
        else:
            ths[k], _ = best_threshold(scores[train], issame[train])
            accs[k] = float(np.mean((scores[test] >= ths[k]) == issame[test]))
    return accs, ths


def roc_points(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) from sklearn, keeping every point: TAR@FAR must see every corner."""
    return roc_curve(issame, scores, drop_intermediate=False)


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray, far: float,
               num_impostor: int) -> tuple[float | None, float | None, str | None]:
    """(TAR, threshold, note) at ``far``: the largest TPR whose FPR <= far.

    With fewer than 1/far impostor pairs the only FPR <= far a threshold can show is 0, which is a
    different quantity: returns (None, None, note) instead of a number that would look like TAR@far.
    """
    needed = math.ceil(1.0 / far - 1e-9)
    if num_impostor < needed:
        return None, None, (f"FAR={far:g} needs at least {needed} impostor pairs, this set has "
                            f"{num_impostor}: TAR not reported")
    ok = fpr <= far + 1e-15
    j = int(np.flatnonzero(ok)[np.argmax(tpr[ok])])
    # roc_curve's first threshold is +inf (accept nothing): not a JSON number, and not a usable threshold
    t = float(thresholds[j]) if np.isfinite(thresholds[j]) else None
    return float(tpr[j]), t, None


def verification_metrics(emb1: ArrayLike, emb2: ArrayLike, issame: ArrayLike, n_folds: int = 10,
                         roc_png: str | Path | None = None, name: str = "") -> dict[str, Any]:
    """All verification numbers for one set of pairs; a JSON-ready dict.

    Args:
        emb1, emb2: (P, d) embeddings of the two sides of each pair (normalised here).
        issame: (P,) bool, True for a genuine pair.
        n_folds: folds for the accuracy protocol (10 as in LFW's protocol).
        roc_png: if given, the ROC is drawn there (PNG).
        name: label for the plot.

    Returns:
        ``accuracy``, ``accuracy_std`` (over folds, ddof 0), ``best_threshold`` (mean of the per-fold
        cosine thresholds), ``auc``, ``tar_at_far`` {"1e-4", "1e-3", "1e-2"} (float or None),
        ``threshold_at_far`` (same keys), ``fold_accuracies``, ``num_pairs``, ``num_genuine``,
        ``num_impostor``, ``notes`` (list of str) and ``roc_png`` (path or None).
    """
    scores = pair_scores(emb1, emb2)
    same = _as_bool(issame, scores.shape[0])
    n_pos = int(same.sum())
    n_neg = int(same.shape[0] - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"verification needs both genuine and impostor pairs; got {n_pos} genuine and "
                         f"{n_neg} impostor")
    accs, ths = kfold_accuracy(scores, same, n_folds)
    fpr, tpr, thr = roc_points(scores, same)
    notes: list[str] = []
    tars: dict[str, float | None] = {}
    tar_thresholds: dict[str, float | None] = {}
    for key, far in FAR_TARGETS.items():
        tar, t, note = tar_at_far(fpr, tpr, thr, far, n_neg)
        tars[key], tar_thresholds[key] = tar, t
        if note:
            notes.append(f"tar_at_far[{key!r}]: {note}")
    result: dict[str, Any] = {
        "accuracy": float(accs.mean()),
        "accuracy_std": float(accs.std()),
        "best_threshold": float(ths.mean()),
        "auc": float(sk_auc(fpr, tpr)),
        "tar_at_far": tars,
        "threshold_at_far": tar_thresholds,
        "fold_accuracies": [float(a) for a in accs],
        "num_pairs": int(same.shape[0]),
        "num_genuine": n_pos,
        "num_impostor": n_neg,
        "notes": notes,
        "roc_png": None,
    }
    if roc_png is not None:
        result["roc_png"] = str(plot_roc({name or "roc": (fpr, tpr)}, roc_png))
    return result


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path,
             title: str = "ROC") -> Path:
    """Draw one or more ROC curves (name -> (fpr, tpr)) on a log-FAR axis and save a PNG.

    Uses matplotlib's object API with the Agg canvas directly, so it never touches pyplot's global
    backend (safe on headless nodes and inside other programs).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(5.5, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    floor = 1e-6
    for label, (fpr, tpr) in curves.items():
        # log axis: FPR = 0 points are drawn at the floor so the curve starts where it really does
        ax.step(np.maximum(fpr, floor), tpr, where="post", label=label)
    for far in FAR_TARGETS.values():
        ax.axvline(far, color="grey", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


@torch.no_grad()
def flip_embed(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Embeddings of each image plus those of its horizontal flip, L2-normalised.

    Args:
        model: maps (B, 3, H, W) to (B, d); must already live on ``images``' device (nothing is moved).
        images: (N, 3, H, W) float images as the model expects them (e.g. in [-1, 1]).
        batch_size: images per forward pass.

    Returns:
        (N, d) float32 on ``images.device``. The model runs in eval mode (BatchNorm statistics, no
        dropout) and is put back into its previous mode afterwards.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("flip_embed needs at least one image")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size]
            # sum before normalising (insightface's convention): the flip acts as test-time augmentation
            e = model(x).float() + model(torch.flip(x, dims=[3])).float()
            out.append(F.normalize(e, dim=1))
    finally:
        model.train(was_training)
    return torch.cat(out)
