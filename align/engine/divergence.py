"""Why two runs came apart: each step's first disagreement, explained or not.

Two training runs in different frameworks agree to rounding until a
discontinuity amplifies a rounding difference: an element whose value sits
within rounding of a threshold lands on different sides of it (a ReLU's zero,
a histogram's bin edge). After that, the runs differ by more than any
tolerance for rounding, and keep differing. This module decides, step by step,
whether the first disagreement has such a cause.

A client reports per step the rows that disagree (in the order they were
compared) and the `Explanation` s it found in that step (ReLU mask flips, bin
flips, ...), each with the kinds of rows it can move in that same step
(``scope``: a flipped ReLU mask moves gradients but the forward values only by
the flipped element's tiny magnitude; a flipped histogram bin moves the losses
too). `classify` then names, for every step with a disagreement, its first
disagreeing row and:

- the explanation of that step whose scope covers the row, else
- the explanation of an earlier step (the update after it moved the
  parameters, so everything after may differ), else
- nothing: "unexplained", which is a failure.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

RELU_SCOPE = frozenset({"gradient", "state"})
# An element within this many float spacings of a threshold (a ReLU's zero, relative to the
# layer's scale; a bin edge) can land on either side of it by rounding alone. Further away,
# a flip is the consequence of an earlier difference, not a cause.
ROUNDING_SPACINGS = 64


@dataclass
class Explanation:
    """A rounding-level cause found in one step.

    Attributes:
        kind: e.g. "ReLU mask flip" or "histogram bin flip".
        count: how many elements flipped.
        detail: where and by how much (layer, magnitudes against float spacing, ...).
        scope: the kinds of rows it can move in its own step (see `classify`'s ``row_kind``).
    """

    kind: str
    count: int
    detail: str
    scope: frozenset[str] = field(default_factory=frozenset)


@dataclass
class StepEvidence:
    """A step's disagreeing row names (in comparison order) and the causes found in it."""

    step: int
    disagreeing: Sequence[str]
    explanations: Sequence[Explanation] = ()


class Divergence(NamedTuple):
    """A step's first disagreement and what explains it."""

    step: int
    row: str
    verdict: str  # "expected rounding" or "unexplained"
    cause: str  # the explanation's kind, "propagated from step k", or ""
    count: int
    detail: str


def classify(evidence: Sequence[StepEvidence], row_kind: Callable[[str], str]) -> list[Divergence]:
    """One `Divergence` per step with a disagreeing row (see the module docstring).

    ``row_kind`` maps a row name to the kind an explanation's ``scope`` lists
    (for example ``"loss"`` or ``"gradient"``).
    """
    out: list[Divergence] = []
    first_explained: Explanation | None = None
    first_step = 0
    for step in sorted(evidence, key=lambda e: e.step):
        if step.disagreeing:
            row = step.disagreeing[0]
            kind = row_kind(row)
            here = next((e for e in step.explanations if kind in e.scope), None)
            if here is not None:
                out.append(Divergence(step.step, row, "expected rounding", here.kind, here.count, here.detail))
            elif first_explained is not None:
                out.append(Divergence(step.step, row, "expected rounding", f"propagated from step {first_step}",
                                      first_explained.count, first_explained.detail))
            else:
                out.append(Divergence(step.step, row, "unexplained", "", 0,
                                      "no rounding-level cause in this step or before it"))
        # Causes found in a step reach every later step through the update, even
        # when they moved no compared row of their own step.
        if first_explained is None and step.explanations:
            first_explained, first_step = step.explanations[0], step.step
    return out


def explained(divergences: Sequence[Divergence]) -> bool:
    """True when no divergence is unexplained."""
    return all(d.verdict != "unexplained" for d in divergences)


def describe(divergences: Sequence[Divergence], unit: str = "step") -> str:
    """One sentence for a report: how many ``unit`` s disagreed and whether each is explained."""
    unexplained = [d for d in divergences if d.verdict == "unexplained"]
    if unexplained:
        why = f"{len(unexplained)} unexplained, first at {unit} {unexplained[0].step} ({unexplained[0].row})"
    else:
        causes = ", ".join(sorted({d.cause for d in divergences if not d.cause.startswith("propagated")}))
        why = f"each explained ({causes or 'no disagreement'})"
    return (f"{len(divergences)} {unit}s with a disagreement, {why} (its tolerances do not decide the "
            f"verdict, an unexplained disagreement does)")


def relu_flips(step_layers: dict[str, list]) -> Explanation | None:
    """A step's ReLU mask flips at rounding level (`align.engine.capture.ReluMaskCensus.step_layers`:
    within `ROUNDING_SPACINGS` of zero at the layer's scale); None when there is none. A flip
    moves the gradients (and the state the update writes), not the forward values, in its step."""
    near = {name: int((row[3] <= ROUNDING_SPACINGS).sum()) for name, row in step_layers.items()}
    total = sum(near.values())
    if not total:
        return None
    layer = max(near, key=near.get)
    count, at_flip, scale, spacings = step_layers[layer]
    flips = sum(row[0] for row in step_layers.values())
    return Explanation(
        "ReLU mask flip", total,
        f"{total} of {flips} flipped elements within {ROUNDING_SPACINGS} float spacings of zero, in "
        f"{sum(1 for n in near.values() if n)} ReLU layers, most in {layer} ({near[layer]}); there the "
        f"closest is {float(spacings.min()):.2g} spacings at the layer's largest |pre-activation| "
        f"{scale:.2e}, the largest |pre-activation| at a flip {at_flip:.2e}", RELU_SCOPE)
