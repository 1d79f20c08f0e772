"""The backward stage's report: rows grouped by category, the per-step and ReLU tables, the loss figure."""
from __future__ import annotations

import io
import math
from typing import Any, NamedTuple

import numpy as np

from align.engine.compare import TensorDiff, worst_row
from align.engine.divergence import describe
from align.engine.report import Headline
from align.ghm.schedule import LR_TOL

from align.backward.records import BackwardOptions, PairRun


def row_category(name: str, steps: int) -> str:
    """The summary category of a row of `PairRun.rows`."""
    head, _, rest = name.partition(".")
    fixed = {"grad": "gradients, step 1", "param": f"parameters after step {steps}",
             "momentum": f"momentum buffers after step {steps}", "ghm": f"GHM acc_sum after step {steps}"}
    if head in fixed:
        return fixed[head]
    when = "step 1" if head == "step1" else f"steps 2-{steps}"
    if rest == "lr":
        return "learning rate"
    if rest == "grad_norm":
        return f"gradient norm before clipping, {when}"
    return f"loss terms, {when}"


def category_tolerances(opts: BackwardOptions) -> dict[str, float]:
    """Category -> the relative tolerance its rows are checked with."""
    n = opts.steps
    return {
        "loss terms, step 1": opts.loss_tol_first,
        f"loss terms, steps 2-{n}": opts.loss_tol,
        "gradient norm before clipping, step 1": opts.loss_tol_first,
        f"gradient norm before clipping, steps 2-{n}": opts.loss_tol,
        "learning rate": LR_TOL,
        "gradients, step 1": opts.grad_tol,
        f"parameters after step {n}": opts.param_tol,
        f"momentum buffers after step {n}": opts.param_tol,
        f"GHM acc_sum after step {n}": opts.param_tol,
    }


class CategoryRow(NamedTuple):
    """The worst difference of one category of rows of a run."""

    run: str  # the run's dtype
    category: str
    compared: int
    worst_rel: float
    worst_tensor: str
    tolerance: float
    within: bool


class ParameterRow(NamedTuple):
    parameter: str
    max_abs_diff: float
    rel: float
    passed: bool


def summarize(run: PairRun, opts: BackwardOptions) -> list[CategoryRow]:
    """The worst row of each category of the run, with the category's tolerance."""
    groups: dict[str, list[TensorDiff]] = {}
    for row in run.rows:
        groups.setdefault(row_category(row.name, opts.steps), []).append(row)
    out = []
    for category, tol in category_tolerances(opts).items():
        rows = groups.get(category, [])
        if rows:
            worst = worst_row(rows)
            out.append(CategoryRow(run.dtype, category, len(rows), worst.rel_max, worst.name, tol,
                                   all(r.passed for r in rows)))
    return out


def relu_table(runs: list[PairRun]) -> list[list]:
    """Per ReLU layer with a disagreement in some run: flips per run, elements, pre-activation size."""
    names = sorted({n for r in runs for n, row in r.relu_layers.items() if row[0]})
    rows = []
    for name in names:
        cells: list[Any] = [name]
        for run in runs:
            flips, _, size = run.relu_layers.get(name, [0, 0, 0.0])
            cells += [flips, size]
        cells.append(runs[0].relu_layers.get(name, [0, 0, 0.0])[1])
        rows.append(cells)
    total: list[Any] = ["all ReLU layers"]
    for run in runs:
        total += [sum(r[0] for r in run.relu_layers.values()),
                  max((r[2] for r in run.relu_layers.values()), default=0.0)]
    total.append(sum(r[1] for r in runs[0].relu_layers.values()))
    return rows + [total]


def loss_curve_png(runs: list[PairRun], first_tol: float, later_tol: float) -> bytes:
    """Total loss per step of the first run, and the relative difference of every run with the
    checked run's tolerance dashed (``first_tol`` at step 1, ``later_tol`` after it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    main = runs[0]
    steps = np.arange(1, len(main.steps) + 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(steps, [s.loss_mmdet for s in main.steps], "o-", label=f"mmdet ({main.dtype})")
    a.plot(steps, [s.loss_paddle for s in main.steps], "x--", label=f"paddle ({main.dtype})")
    a.set_xlabel("step")
    a.set_ylabel("total loss")
    a.legend()
    for run, marker in zip(runs, "os"):
        # Exact agreement has no logarithm: drawn at the floor of the axis.
        b.semilogy(steps, [max(s.loss_rel, 1e-18) for s in run.steps], marker + "-", label=run.dtype)
    b.plot(steps, [first_tol if k == 1 else later_tol for k in steps], "--", color="#c0392b", linewidth=0.8,
           drawstyle="steps-mid", label=f"tolerance ({main.dtype})")
    b.set_xlabel("step")
    b.set_ylabel("|paddle - mmdet| / |mmdet|")
    # Above the panel: inside, it would sit on the tolerance line or on the curves.
    b.legend(fontsize="small", loc="lower left", bbox_to_anchor=(0, 1), ncol=3, frameon=False)
    for axis in (a, b):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def headline(summaries: list[CategoryRow], dtype: str, bound: float) -> Headline | None:
    row = next((r for r in summaries if r.run == dtype and r.category == "gradients, step 1"), None)
    return None if row is None else Headline(f"worst step-1 gradient ({dtype}), max|diff| / max|ref|",
                                             row.worst_rel, bound, row.worst_tensor)


def side_run(run: PairRun, summaries: list[CategoryRow]) -> str:
    grads = next((r for r in summaries if r.run == run.dtype and r.category == "gradients, step 1"), None)
    flips = sum(r[0] for r in run.relu_layers.values())
    last = run.steps[-1] if run.steps else None
    return (f"{run.dtype}: step-1 gradients worst rel {grads.worst_rel if grads else math.nan:.2e}, "
            f"{flips} ReLU mask flips at step 1, total loss rel {last.loss_rel if last else math.nan:.2e} "
            f"at step {last.step if last else 0}; {describe(run.divergences, 'step')}")
