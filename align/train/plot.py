"""The train stage's figure: both loss curves and their relative difference."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np

# Exact agreement has no logarithm: it is drawn a decade below the smallest
# nonzero difference shown, or here when every difference is zero.
FLOOR = 1e-18


def relative_difference(mmdet: Sequence[float], paddle: Sequence[float]) -> np.ndarray:
    """``(K,)`` ``|paddle - mmdet| / |mmdet|`` of two ``(K,)`` loss sequences."""
    ref, got = np.asarray(mmdet, np.float64), np.asarray(paddle, np.float64)
    return np.abs(got - ref) / np.maximum(np.abs(ref), 1e-30)


def loss_curves_png(mmdet: Sequence[float], paddle: Sequence[float], tolerance: float, label: str = "",
                    extra: tuple[str, Sequence[float], Sequence[float]] | None = None) -> bytes:
    """PNG: total loss per iteration of both sides (left, ``(K,)`` each) and
    ``|paddle - mmdet| / |mmdet|`` on a log scale with the tolerance dashed
    (right). ``label`` names the run (its precision); ``extra``, as
    ``(label, mmdet, paddle)``, adds a second run's relative difference to the
    right panel only. Exact agreement is drawn a decade below the smallest
    nonzero difference."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    iters = np.arange(1, len(mmdet) + 1)
    suffix = f" ({label})" if label else ""
    figure = Figure(figsize=(10, 3.6), dpi=90)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    left.plot(iters, np.asarray(mmdet, np.float64), "o-", label=f"mmdet{suffix}")
    left.plot(iters, np.asarray(paddle, np.float64), "x--", label=f"paddle{suffix}")
    left.set_xlabel("iteration")
    left.set_ylabel("total loss")
    left.legend()
    curves = [(label or "checked", "o-", relative_difference(mmdet, paddle))]
    if extra is not None:
        extra_label, extra_mmdet, extra_paddle = extra
        curves.append((f"{extra_label} (informational)", "s:", relative_difference(extra_mmdet, extra_paddle)))
    nonzero = [v for _, _, rel in curves for v in rel if v > 0]
    floor = min(nonzero) / 10 if nonzero else FLOOR
    for name, style, rel in curves:
        right.semilogy(np.arange(1, len(rel) + 1), np.maximum(rel, floor), style, label=name)
    right.axhline(tolerance, color="#c0392b", linestyle="--", linewidth=0.8, label="tolerance")
    right.set_xlabel("iteration")
    right.set_ylabel("|paddle - mmdet| / |mmdet|")
    # Above the panel: inside, it would sit on the tolerance line or on the curves.
    right.legend(fontsize="small", loc="lower left", bbox_to_anchor=(0, 1), ncol=3, frameon=False)
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    buffer = io.BytesIO()
    # No "Software" chunk: it would carry matplotlib's URL into the page.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
