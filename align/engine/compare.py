"""Numeric comparison of one array against its reference (reprod_log's logs are in `reprod`).

`diff_arrays` is the single place where the toolkit decides whether two
arrays agree. It is stricter than reprod_log's own check in one way that
matters: reprod_log tests ``mean_diff > threshold``, which is False for NaN,
so a model that produces NaN everywhere "passes" there. Here any NaN or Inf
on either side fails, whatever the tolerances.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

DEFAULT_REL_TOL = 1e-5
DEFAULT_MEAN_TOL = 1e-5



@dataclass
class TensorDiff:
    """How one named array differs from its reference.

    ``max_abs`` and ``mean_abs`` are taken over ``|test - reference|``;
    ``rel_max`` is ``max_abs / max|reference|``; when the reference is all
    zero it is 0 if the test is too, else inf. Figures are NaN when they
    cannot be computed (shapes differ, a side is missing, NaN/Inf inputs).
    """

    name: str
    ref_shape: tuple[int, ...] | None
    test_shape: tuple[int, ...] | None
    max_abs: float
    mean_abs: float
    ref_max_abs: float
    rel_max: float
    finite: bool
    passed: bool
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict: shapes as lists, non-finite floats as "nan"/"inf"/"-inf"."""
        out = asdict(self)
        for key in ("ref_shape", "test_shape"):
            out[key] = None if out[key] is None else list(out[key])
        for key in ("max_abs", "mean_abs", "ref_max_abs", "rel_max"):
            out[key] = json_float(out[key])
        return out


def json_float(value: float) -> float | str:
    """``value`` itself when finite, else "nan", "inf" or "-inf" (strict JSON has no NaN)."""
    value = float(value)
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"


def missing_row(name: str, *, ref_shape=None, test_shape=None, reason: str) -> TensorDiff:
    """A failed row for an array that exists on one side only."""
    nan = float("nan")
    return TensorDiff(
        name=name,
        ref_shape=None if ref_shape is None else tuple(ref_shape),
        test_shape=None if test_shape is None else tuple(test_shape),
        max_abs=nan,
        mean_abs=nan,
        ref_max_abs=nan,
        rel_max=nan,
        finite=False,
        passed=False,
        reason=reason,
    )


def _as_float(name: str, value: Any, side: str) -> np.ndarray:
    """float32 arrays stay float32 (activations run to gigabytes; a float32
    difference is exact to 6e-8 of itself, far below any tolerance here);
    everything else becomes float64."""
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise TypeError(
            f"{name!r}: {side} array has dtype {array.dtype}, expected bool, integer or float"
        )
    return array if array.dtype == np.float32 else array.astype(np.float64)


def _non_finite_reason(array: np.ndarray, side: str) -> list[str]:
    reasons = []
    if np.isnan(array).any():
        reasons.append(f"NaN in {side}")
    if np.isinf(array).any():
        reasons.append(f"Inf in {side}")
    return reasons


# Elements per block of `_abs_diff_stats`: its temporaries stay in the CPU cache
# instead of allocating (and page-faulting) arrays of a whole activation.
_BLOCK = 1 << 16


def _abs_diff_stats(ref: np.ndarray, tst: np.ndarray) -> tuple[float, float, float]:
    """``(max|tst - ref|, sum|tst - ref| in float64, max|ref|)`` of two arrays of one shape
    and dtype, block by block; NaN in either side makes the figures it reaches NaN,
    as whole-array reductions do."""
    ref, tst = ref.reshape(-1), tst.reshape(-1)
    if ref.size == 0:
        return 0.0, 0.0, 0.0
    buffer = np.empty(min(_BLOCK, ref.size), dtype=ref.dtype)
    max_abs = sum_abs = ref_max_abs = 0.0
    # inf - inf is NaN by design: the figures then say "not comparable".
    with np.errstate(invalid="ignore", over="ignore"):
        for begin in range(0, ref.size, _BLOCK):
            r, t = ref[begin:begin + _BLOCK], tst[begin:begin + _BLOCK]
            block = buffer[:r.size]
            np.abs(r, out=block)
            ref_max_abs = _max_nan(ref_max_abs, float(block.max()))
            np.subtract(t, r, out=block)
            np.abs(block, out=block)
            max_abs = _max_nan(max_abs, float(block.max()))
            sum_abs += float(block.sum(dtype=np.float64))
    return max_abs, sum_abs, ref_max_abs


def _max_nan(a: float, b: float) -> float:
    """The larger of ``a`` and ``b``, NaN when either is (as ``ndarray.max`` propagates NaN)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def diff_arrays(
    name: str,
    reference: Any,
    test: Any,
    *,
    rel_tol: float = DEFAULT_REL_TOL,
    mean_tol: float = DEFAULT_MEAN_TOL,
    ref_label: str = "reference",
    test_label: str = "paddle",
) -> TensorDiff:
    """Compare ``test`` against ``reference`` element-wise (float32 pairs in
    float32 with a float64 mean, everything else in float64).

    Args:
        name: key reported in the row.
        reference, test: arrays of the same shape (anything ``np.asarray``
            takes: ndarrays, Python scalars, nested lists); bool, integer or
            float. Integers are compared as float64, exact below 2**53.
        rel_tol: bound on ``max|test - reference| / max|reference|``.
        mean_tol: bound on ``mean|test - reference|``.
        ref_label, test_label: how the two sides are named in ``reason``.

    Passes only when shapes match, every value on both sides is finite, and
    both bounds hold.
    """
    ref = _as_float(name, reference, ref_label)
    tst = _as_float(name, test, test_label)
    if ref.dtype != tst.dtype:
        ref, tst = ref.astype(np.float64), tst.astype(np.float64)

    if ref.shape != tst.shape:
        finite = bool(np.isfinite(ref).all() and np.isfinite(tst).all())
        row = missing_row(
            name,
            ref_shape=ref.shape,
            test_shape=tst.shape,
            reason=f"shape mismatch {ref.shape} vs {tst.shape}",
        )
        row.finite = finite
        row.ref_max_abs = float(np.abs(ref).max()) if ref.size else 0.0
        return row

    max_abs, sum_abs, ref_max_abs = _abs_diff_stats(ref, tst)
    mean_abs = sum_abs / ref.size if ref.size else 0.0
    # max|.| is NaN or Inf exactly when some element is; only then is each side
    # inspected (an overflowing finite difference also lands here).
    finite = math.isfinite(ref_max_abs) and math.isfinite(max_abs)
    if not finite:
        finite = bool(np.isfinite(ref).all() and np.isfinite(tst).all())

    if ref_max_abs == 0.0:
        rel_max = 0.0 if max_abs == 0.0 else float("inf")
    else:
        rel_max = max_abs / ref_max_abs

    reasons = [] if finite else _non_finite_reason(ref, ref_label) + _non_finite_reason(tst, test_label)
    if not reasons:
        if not rel_max <= rel_tol:
            reasons.append(f"rel {rel_max:.1e} > {rel_tol:.0e}")
        if not mean_abs <= mean_tol:
            reasons.append(f"mean {mean_abs:.1e} > {mean_tol:.0e}")
    integers = np.asarray(reference).dtype.kind in "iu" and np.asarray(test).dtype.kind in "iu"
    if not reasons and integers and max_abs == 0.0 and not np.array_equal(reference, test):
        # Integers beyond 2**53 can collapse to the same float64.
        reasons.append("integer values differ beyond float64 precision")

    return TensorDiff(
        name=name,
        ref_shape=ref.shape,
        test_shape=tst.shape,
        max_abs=max_abs,
        mean_abs=mean_abs,
        ref_max_abs=ref_max_abs,
        rel_max=rel_max,
        finite=finite,
        passed=not reasons,
        reason="; ".join(reasons),
    )


def first_failure(rows: Sequence[TensorDiff]) -> int | None:
    """Index of the first failed row in ``rows`` (execution order), None if all pass."""
    for index, row in enumerate(rows):
        if not row.passed:
            return index
    return None


def first_failed_name(*row_lists: Sequence[TensorDiff]) -> str | None:
    """The name of the first failed row of the first list that has one, None if all pass."""
    for rows in row_lists:
        index = first_failure(rows)
        if index is not None:
            return rows[index].name
    return None


def all_passed(rows: Iterable[TensorDiff]) -> bool:
    """True when every row passed (and also for no rows)."""
    return all(row.passed for row in rows)


# ------------------------------------------------------- named tensors and scalars


def to_numpy(tensor, keep: bool = True) -> np.ndarray:
    """A numpy array of a torch or Paddle tensor (same shape and dtype).

    With ``keep`` the array is a copy that later in-place updates of the
    tensor leave alone; without it a torch tensor may be returned as a view,
    for a comparison made at once. (Paddle's ``numpy()`` always copies.)
    """
    if type(tensor).__module__.startswith("torch"):
        array = tensor.detach().cpu().numpy()
        return array.copy() if keep else array
    if isinstance(tensor, np.ndarray):
        return tensor.copy() if keep else tensor
    return tensor.numpy()


def worst_of(rows: list[TensorDiff]) -> tuple[float, str]:
    """``(rel_max, name)`` of `worst_row`; ``(nan, "")`` for no rows."""
    worst = worst_row(rows)
    return (worst.rel_max, worst.name) if worst else (math.nan, "")


def worst_row(rows: Iterable[TensorDiff]) -> TensorDiff | None:
    """The row with the largest ``rel_max``, a NaN one first; None for no rows."""
    return max(rows, key=lambda r: math.inf if math.isnan(r.rel_max) else r.rel_max, default=None)


def compare_named(prefix: str, reference: Mapping[str, Any], test: Mapping[str, Any], tol: float,
                  logs: tuple[dict, dict] | None = None, mean_tol: float | None = None) -> list[TensorDiff]:
    """One row per tensor of ``reference`` against ``test``, by name.

    Rows are named ``{prefix}.{name}``; a name on one side only is a failed
    row. ``tol`` bounds the relative difference and, unless ``mean_tol`` is
    given, the mean absolute one. ``logs``, when given, is a ``(reference, test)`` pair of dicts that
    receives the compared arrays under the row names (for reprod_log).
    Without it the tensors are converted one at a time and dropped, so no
    copy of a whole model is held.
    """
    rows = []
    keep = logs is not None
    for name, tensor in reference.items():
        key = f"{prefix}.{name}"
        ref = to_numpy(tensor, keep)
        if name not in test:
            rows.append(missing_row(key, ref_shape=ref.shape, reason="missing in paddle"))
            continue
        tst = to_numpy(test[name], keep)
        rows.append(diff_arrays(key, ref, tst, rel_tol=tol, mean_tol=tol if mean_tol is None else mean_tol))
        if logs is not None:
            logs[0][key], logs[1][key] = ref, tst
    for name in sorted(test.keys() - reference.keys()):
        rows.append(missing_row(f"{prefix}.{name}", test_shape=tuple(test[name].shape),
                                reason="missing in reference"))
    return rows


def worst_named(prefix: str, reference: Mapping[str, Any], test: Mapping[str, Any]) -> tuple[float, str]:
    """``(max over names of max|test - ref| / max|ref|, its row name)``: the
    informational per-step figure, without the full checks of `diff_arrays`.

    A name on one side only or a shape mismatch counts as NaN, which ranks
    worst; a NaN in the data propagates to NaN as well.
    """
    worst, worst_name = -1.0, ""
    for name in reference.keys() | test.keys():
        if name in reference and name in test:
            ref, tst = to_numpy(reference[name], keep=False), to_numpy(test[name], keep=False)
            if ref.shape != tst.shape:
                rel = math.nan
            elif ref.size == 0:
                rel = 0.0
            else:
                if ref.dtype == tst.dtype and ref.dtype.kind == "f":
                    diff, _, scale = _abs_diff_stats(ref, tst)
                else:
                    scale = float(np.abs(ref).max())
                    diff = float(np.abs(tst - ref).max())
                rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
        else:
            rel = math.nan
        if math.isnan(rel) or rel > worst:
            worst, worst_name = rel, f"{prefix}.{name}"
            if math.isnan(rel):
                break
    return worst, worst_name


def compare_scalars(reference: Mapping[str, float], test: Mapping[str, float], tol: float,
                    logs: tuple[dict, dict] | None) -> list[TensorDiff]:
    """Rows for scalars named alike on both sides (losses, norms, learning rates)."""
    rows = []
    for name, ref in reference.items():
        ref, tst = np.float64(ref), np.float64(test[name])
        rows.append(diff_arrays(name, ref, tst, rel_tol=tol, mean_tol=tol))
        if logs is not None:
            logs[0][name], logs[1][name] = ref, tst
    return rows
