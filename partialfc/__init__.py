"""Partial FC: the class-weight matrix sharded across ranks, sampled margin softmax, DiscFace hook.

Public names (docs/design.md): :class:`PartialFC`, :func:`class_range`, :data:`comm_stats`,
:func:`save_head`, :func:`load_head` (the head's checkpoint, resharded by class range on load:
:mod:`partialfc.resharding`), :class:`StepRecord` (what a forward leaves in ``head.record``).
"""

from partialfc.collectives import comm_stats
from partialfc.head import PartialFC
from partialfc.optimizer import PartialFCAdamW, PartialFCSGD
from partialfc.partition import class_range
from partialfc.resharding import load_head, save_head
from partialfc.step_record import StepRecord

__all__ = ["PartialFC", "PartialFCAdamW", "PartialFCSGD", "StepRecord", "class_range", "comm_stats", "load_head",
           "save_head"]
