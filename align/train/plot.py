"""The train stage's figure: both loss curves and their relative difference."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np


def loss_curves_png(mmdet: Sequence[float], paddle: Sequence[float], tolerance: float) -> bytes:
    """PNG: total loss per iteration of both sides (left) and ``|paddle - mmdet| / |mmdet|``
    on a log scale with the tolerance dashed (right); exact agreement is drawn at 1e-12."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    iters = np.arange(1, len(mmdet) + 1)
    ref, got = np.asarray(mmdet, np.float64), np.asarray(paddle, np.float64)
    rel = np.abs(got - ref) / np.maximum(np.abs(ref), 1e-30)
    figure = Figure(figsize=(10, 3.6), dpi=90)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    left.plot(iters, ref, "o-", label="mmdet")
    left.plot(iters, got, "x--", label="paddle")
    left.set_xlabel("iteration")
    left.set_ylabel("total loss")
    left.legend()
    right.semilogy(iters, np.maximum(rel, 1e-12), "o-")
    right.axhline(tolerance, color="#c0392b", linestyle="--", linewidth=0.8)
    right.set_xlabel("iteration")
    right.set_ylabel("|paddle - mmdet| / |mmdet|")
    figure.tight_layout()
    buffer = io.BytesIO()
    # No "Software" chunk: it would carry matplotlib's URL into the page.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
