"""What a measured KL divergence may be: checked without torch, so that the study loop can check
the values its objective returns (abliterate.study imports no torch)."""

from __future__ import annotations

import math

from .errors import NumericalError

# Rounding can make an exact zero come out as a tiny negative number.
NEGATIVE_TOLERANCE = 1e-6


def checked(value: float) -> float:
    """``value`` as computed, or :class:`NumericalError` for NaN, infinity or a negative beyond rounding."""
    if not math.isfinite(value):
        raise NumericalError(
            f"KL divergence is {value}: the edited model produced NaN or -inf log-probabilities "
            "(check the ablation weights and the model dtype)"
        )
    if value < -NEGATIVE_TOLERANCE:
        raise NumericalError(
            f"KL divergence is negative ({value:.3g}); the log-probabilities are not normalised "
            "or base and edited rows do not correspond"
        )
    return value
