"""The backward stage's report tables: rows grouped by category, the ReLU census, the headline."""
from __future__ import annotations

import math
from typing import Any, NamedTuple

from align.engine.compare import TensorDiff, worst_row
from align.engine.divergence import describe
from align.engine.report import Headline

from align.backward.records import PairRun


def row_category(name: str, steps: int, state_labels: dict[str, str]) -> str:
    """The summary category of a row of `PairRun.rows` (``state_labels``: state group -> label)."""
    head, _, rest = name.partition(".")
    fixed = {"grad": "gradients, step 1", "param": f"parameters after step {steps}",
             **{group: f"{label} after step {steps}" for group, label in state_labels.items()}}
    if head in fixed:
        return fixed[head]
    when = "step 1" if head == "step1" else f"steps 2-{steps}"
    if rest == "lr":
        return "learning rate"
    if rest == "grad_norm":
        return f"gradient norm before clipping, {when}"
    return f"loss terms, {when}"


def category_tolerances(bounds, steps: int, state_labels: dict[str, str]) -> dict[str, float]:
    """Category -> the relative bound its rows are checked with (``bounds``: `lockstep.Bounds`)."""
    return {
        "loss terms, step 1": bounds.loss_first,
        f"loss terms, steps 2-{steps}": bounds.loss,
        "gradient norm before clipping, step 1": bounds.loss_first,
        f"gradient norm before clipping, steps 2-{steps}": bounds.loss,
        "learning rate": bounds.lr,
        "gradients, step 1": bounds.grad,
        f"parameters after step {steps}": bounds.state,
        **{f"{label} after step {steps}": bounds.state for label in state_labels.values()},
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


def summarize(run: PairRun, steps: int, state_labels: dict[str, str]) -> list[CategoryRow]:
    """The worst row of each category of the run, with the category's bound (rows passed on
    their layer's scale ranked only when nothing else is)."""
    groups: dict[str, list[TensorDiff]] = {}
    for row in run.rows:
        groups.setdefault(row_category(row.name, steps, state_labels), []).append(row)
    out = []
    for category, tol in category_tolerances(run.bounds, steps, state_labels).items():
        rows = groups.get(category, [])
        if rows:
            # A row that passed over the bound passed on its layer's scale (`Bounds.layer_scaled`):
            # its relative figure is rounding noise over a zero tensor, not the category's worst.
            worst = worst_row(r for r in rows if not (r.passed and r.rel_max > tol)) or worst_row(rows)
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


def headline(summaries: list[CategoryRow], dtype: str) -> Headline | None:
    """The worst step-1 gradient of the checked run, or, when a category is over its bound, the
    first such category's worst row."""
    rows = [r for r in summaries if r.run == dtype]
    row = next((r for r in rows if not r.within), None)
    if row is not None:
        return Headline(f"worst of {row.category} ({dtype}), max|diff| / max|ref|", row.worst_rel, row.tolerance,
                        row.worst_tensor)
    row = next((r for r in rows if r.category == "gradients, step 1"), None)
    return None if row is None else Headline(f"worst step-1 gradient ({dtype}), max|diff| / max|ref|",
                                             row.worst_rel, row.tolerance, row.worst_tensor)


def side_run(run: PairRun, summaries: list[CategoryRow]) -> str:
    grads = next((r for r in summaries if r.run == run.dtype and r.category == "gradients, step 1"), None)
    flips = sum(r[0] for r in run.relu_layers.values())
    last = run.steps[-1] if run.steps else None
    return (f"{run.dtype}: step-1 gradients worst rel {grads.worst_rel if grads else math.nan:.2e}, "
            f"{flips} ReLU mask flips at step 1, total loss rel {last.loss_rel if last else math.nan:.2e} "
            f"at step {last.step if last else 0}; {describe(run.divergences, 'step')}")
