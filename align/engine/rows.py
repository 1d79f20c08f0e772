"""Comparison rows with an absolute tolerance or exact equality, on top of ``diff_arrays``.

``diff_arrays`` bounds the relative max difference and the mean absolute
difference. Some comparisons state their tolerances in absolute terms (pixels,
score units) or ask for equality; these helpers turn that into its two bounds.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .compare import TensorDiff, diff_arrays, missing_row


def abs_row(name: str, reference: Any, test: Any, atol: float) -> TensorDiff:
    """Passes when ``max|test - reference| <= atol`` (within float rounding of the division) and shapes match.

    The relative bound is set to ``atol / max|reference|``; an all-zero
    reference then allows no difference at all.
    """
    ref = np.asarray(reference)
    ref_max = float(np.abs(ref).max()) if ref.size and np.isfinite(ref).all() else 0.0
    rel_tol = atol / ref_max if ref_max > 0 else 0.0
    return diff_arrays(name, reference, test, rel_tol=rel_tol, mean_tol=atol)


def exact_row(name: str, reference: Any, test: Any) -> TensorDiff:
    """Passes only when shapes and every value are equal."""
    return diff_arrays(name, reference, test, rel_tol=0.0, mean_tol=0.0)


def absent_row(name: str, side: str) -> TensorDiff:
    """A failed row for a quantity only one side produced."""
    return missing_row(name, reason=f"missing in {side}")
