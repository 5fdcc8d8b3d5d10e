"""DiscFace (Kim et al., "DiscFace: Minimum Discrepancy Learning for Deep Face Recognition", ACCV 2020).

Pure math on local tensors: this package never imports ``torch.distributed``; the sharded head in
``partialfc`` does the communication around it.

What DiscFace adds
------------------
A softmax penalises every feature at the same angle from its class weight alike, whatever direction
it lies in. At evaluation, though, features are compared with features, so two features of one
identity that sit on opposite sides of their class weight score badly even though each one trained
well. DiscFace learns one vector xi, shared by all classes, and pulls every displacement
eps_i = z_hat_i - w_hat_{y_i} towards it:

    xi     = unit(b) * min(||b||, cap)                 b: learnable (d,), cap 0.05   (DisplacementBasis)
    L_disc = (1/N) * sum_i || eps_i - xi ||_2          plain L2 norm, not squared
    L      = L_softmax + lambda * L_disc

b starts as a small random vector, not zero: at b = 0 the capped map has no usable gradient, so b
would never move (see ``basis.py``).

Single process
--------------
``DiscFaceLoss(d)(embeddings, labels, weight)`` is Algorithm 1 for an ordinary (C, d) classifier and
returns L_disc; ``MarginSoftmaxDiscFaceLoss`` adds a CosFace/ArcFace softmax and returns
(total, softmax, disc).

Distributed form (what ``partialfc.PartialFC(..., discface_lambda=...)`` does)
-------------------------------------------------------------------------------
The class weights are split by rows: rank k owns the classes [c_k, c_{k+1}). The term is a sum over
samples, and each sample's term needs only its own z_hat_i, its own class row w_hat_{y_i} and xi, so:

1. every rank sees the global batch's normalised embeddings z_hat (N x d, gathered with autograd);
2. rank k takes the samples whose label it owns -- their class rows are always among its sampled
   rows, since positives are never dropped by Partial FC's sampling -- and computes
   D_k = displacement_sum(z_hat_own, w_hat_own, xi) (0 when it owns none of the batch's labels);
3. the D_k are all-reduced (summed): L_disc = (1/N) * sum_k D_k, the same scalar on every rank, and
   exactly the single-process value on the concatenated batch because every sample is owned once;
4. backward: z_hat's gradient flows back through the gather to the rank that produced the sample;
   the class rows' gradient stays on their owner; b is replicated (same seed everywhere), and its
   gradient, each rank's local dD_k/db, is summed over ranks inside the head's backward, so it is
   identical on every rank before the optimizer step. b is not a backbone parameter, so DDP or
   DeepSpeed never average it; only the backbone's own gradients are averaged, which the launcher
   accounts for.

The cost is one extra (n_owned x d) subtraction and norm per rank and one scalar all-reduce.

Diagnostics
-----------
``discrepancy_stats(z_hat, w_hat, labels, xi)`` gives the two discrepancies the paper names:
directional (how far a class's displacements point different ways) and radial (how much their
lengths vary). All samples of a class are owned by the same rank, so each rank's per-class numbers
are exact; the global average over classes is the ``num_classes``-weighted mean of the per-rank
results. ``heldout_discrepancy`` does the same for held-out identities, using class mean features
in place of class weights.
"""

from discface.basis import DisplacementBasis, capped_basis
from discface.diagnostics import DISCREPANCY_KEYS, discrepancy_stats, heldout_discrepancy
from discface.loss import (
    DiscFaceLoss,
    DiscFaceTerms,
    MarginSoftmaxDiscFaceLoss,
    displacement_sum,
    margin_softmax_loss,
)
from discface.margins import target_cos_with_margin, validate_margin

__all__ = [
    "DISCREPANCY_KEYS",
    "DiscFaceLoss",
    "DiscFaceTerms",
    "DisplacementBasis",
    "MarginSoftmaxDiscFaceLoss",
    "capped_basis",
    "discrepancy_stats",
    "displacement_sum",
    "heldout_discrepancy",
    "margin_softmax_loss",
    "target_cos_with_margin",
    "validate_margin",
]
