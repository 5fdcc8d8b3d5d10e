"""Combined margin (m1, m2, m3) on the target cosine: re-exported from :mod:`discface.margins`.

There is ONE implementation (and one validator), shared by this head, the single-process
``discface.margin_softmax_loss`` and the config schema. It lives in ``discface`` because imports run
``partialfc -> discface`` (``discface`` cannot import ``partialfc``); see that module for the formula,
the continuous extension past ``m1 theta + m2 = pi`` and the gradients.
"""

from __future__ import annotations

from discface.margins import Margin, switch_cos, target_cos_with_margin, validate_margin

__all__ = ["Margin", "switch_cos", "target_cos_with_margin", "validate_margin"]
