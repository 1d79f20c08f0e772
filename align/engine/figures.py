"""The figure of a training comparison: both sides' loss per step and their relative difference."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np

# Exact agreement has no logarithm: it is drawn a decade below the smallest
# nonzero difference shown, or here when every difference is zero.
FLOOR = 1e-18


def relative_difference(reference: Sequence[float], test: Sequence[float]) -> np.ndarray:
    """``(K,)`` ``|test - reference| / |reference|`` of two ``(K,)`` loss sequences."""
    ref, got = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    return np.abs(got - ref) / np.maximum(np.abs(ref), 1e-30)


def loss_curves_png(reference: Sequence[float], test: Sequence[float], tolerance: float, label: str = "",
                    extra: tuple[str, Sequence[float], Sequence[float]] | None = None, *,
                    names: tuple[str, str] = ("reference", "test"), step: str = "iteration") -> bytes:
    """PNG: total loss per step of both sides (left, ``(K,)`` each) and
    ``|test - reference| / |reference|`` on a log scale with the tolerance
    dashed (right). ``label`` names the run (its precision); ``extra``, as
    ``(label, reference, test)``, adds a second run's relative difference to
    the right panel only; ``names`` are the two sides' (``("torch", "paddle")``)
    and ``step`` what the x axis counts. Exact agreement is drawn a decade below
    the smallest nonzero difference."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ref_name, test_name = names
    steps = np.arange(1, len(reference) + 1)
    suffix = f" ({label})" if label else ""
    figure = Figure(figsize=(10, 3.6), dpi=90)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    left.plot(steps, np.asarray(reference, np.float64), "o-", label=f"{ref_name}{suffix}")
    left.plot(steps, np.asarray(test, np.float64), "x--", label=f"{test_name}{suffix}")
    left.set_xlabel(step)
    left.set_ylabel("total loss")
    left.legend()
    curves = [(label or "checked", "o-", relative_difference(reference, test))]
    if extra is not None:
        extra_label, extra_reference, extra_test = extra
        curves.append((f"{extra_label} (informational)", "s:", relative_difference(extra_reference, extra_test)))
    nonzero = [v for _, _, rel in curves for v in rel if v > 0]
    floor = min(nonzero) / 10 if nonzero else FLOOR
    for name, style, rel in curves:
        right.semilogy(np.arange(1, len(rel) + 1), np.maximum(rel, floor), style, label=name)
    right.axhline(tolerance, color="#c0392b", linestyle="--", linewidth=0.8, label="tolerance")
    right.set_xlabel(step)
    right.set_ylabel(f"|{test_name} - {ref_name}| / |{ref_name}|")
    # Above the panel: inside, it would sit on the tolerance line or on the curves.
    right.legend(fontsize="small", loc="lower left", bbox_to_anchor=(0, 1), ncol=3, frameon=False)
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    buffer = io.BytesIO()
    # No "Software" chunk: it would carry matplotlib's URL into the page.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
