"""Two models trained in lockstep, compared at every step.

A *side* is one framework's model with its optimizer and learning-rate
schedule behind a small protocol (`Side`): one training step on a batch,
with a hook between backward and the update, and the named tensors a
comparison needs (gradients, parameters, other state such as optimizer
buffers). `train_in_lockstep` drives a reference side and a test side
through the same sequence of batches (each side gets its own form of the
batch, as its own data pipeline makes it) and compares, at every step, the
loss terms, the gradient norm before clipping and the learning rate.

The test side's step runs inside the reference side's ``after_backward``,
so when the test side reaches its own ``after_backward`` both sides hold
their gradients of the same step: that is where a caller compares them
(``at_gradients``). Both sides' forward passes thus also run in a fixed
order, reference first, which hooks pairing calls across the frameworks
(`~align.engine.capture.ReluMaskCensus`) rely on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence

from .compare import TensorDiff, diff_arrays


@dataclass
class StepValues:
    """What one training step of a side computed.

    Attributes:
        losses: loss terms by name, in the order they are compared (for
            example per level, then sums, then the total).
        grad_norm: the global gradient norm before clipping.
        lr: the learning rate the update used.
    """

    losses: dict[str, float]
    grad_norm: float
    lr: float


class Side(Protocol):
    """One framework's model, optimizer and schedule, as `train_in_lockstep` drives them."""

    name: str  # how reports and failure reasons name the side, e.g. "torch" or "paddle"

    def train_step(self, batch: Any, after_backward: Optional[Callable[[], None]] = None) -> StepValues:
        """Forward and backward on ``batch``, ``after_backward()`` with the gradients in
        place, then clipping, the update, the gradients cleared and the schedule advanced."""

    def gradients(self) -> Mapping[str, Any]:
        """The gradient of every trainable parameter that has one, by parameter name."""

    def parameters(self) -> Mapping[str, Any]:
        """The parameters by name (the names both sides share)."""

    def state(self) -> Mapping[str, Mapping[str, Any]]:
        """Other state that training changes, in named groups (for example ``momentum``)."""


@dataclass
class PairedStep:
    """Both sides' values of one step and the rows that compared them."""

    step: int
    reference: StepValues
    test: StepValues
    rows: list[TensorDiff]


@dataclass
class LockstepRun:
    """The outcome of `train_in_lockstep`.

    Attributes:
        rows: every compared row in execution order, so the first failed
            row is the first divergence.
        steps: one `PairedStep` per step.
        seconds: time spent in each side's steps, by side name, without
            the comparisons and the other side's step.
    """

    rows: list[TensorDiff] = field(default_factory=list)
    steps: list[PairedStep] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


Tolerance = Callable[[int, str], tuple[float, float]]


def train_in_lockstep(reference: Side, test: Side, batches: Iterable[tuple[Any, Any]], *,
                      label: Callable[[int], str], tolerance: Tolerance,
                      at_gradients: Optional[Callable[[int], list[TensorDiff]]] = None,
                      before_step: Optional[Callable[[int], None]] = None,
                      after_step: Optional[Callable[[PairedStep], list[TensorDiff]]] = None,
                      progress: Optional[Callable[[Iterable], Iterable]] = None) -> LockstepRun:
    """Train both sides on ``batches`` and compare every step.

    Args:
        reference, test: the sides; differences are ``test - reference``.
        batches: per step, ``(reference's batch, test's batch)``.
        label: step number (1-based) -> the prefix of that step's row
            names, e.g. ``step3`` or ``iter003``.
        tolerance: ``(step, value name) -> (rel_tol, mean_tol)`` for a
            compared value (a loss term, ``grad_norm`` or ``lr``); see `diff_arrays`.
        at_gradients: called with the step number while both sides hold
            their gradients; its rows follow the step's loss rows.
        before_step: called with the step number before either side runs.
        after_step: called after both updates; its rows close the step's rows.
        progress: wraps the batches for display (e.g. a tqdm bar).

    Rows of a step, in order: the loss terms (in the reference's order, a
    term one side lacks fails), ``at_gradients``' rows, ``grad_norm``,
    ``lr``, ``after_step``'s rows.
    """
    run = LockstepRun(seconds={reference.name: 0.0, test.name: 0.0})
    steps = batches if progress is None else progress(batches)
    for step, (ref_batch, test_batch) in enumerate(steps, start=1):
        if before_step is not None:
            before_step(step)
        inner: dict[str, Any] = {"gradient_rows": [], "compare_s": 0.0}

        def compare_gradients() -> None:
            if at_gradients is not None:
                start = time.perf_counter()
                inner["gradient_rows"] = at_gradients(step)
                inner["compare_s"] = time.perf_counter() - start

        def run_test() -> None:
            start = time.perf_counter()
            inner["values"] = test.train_step(test_batch, after_backward=compare_gradients)
            inner["test_s"] = time.perf_counter() - start

        start = time.perf_counter()
        ref_values = reference.train_step(ref_batch, after_backward=run_test)
        total = time.perf_counter() - start
        if "values" not in inner:
            raise RuntimeError(f"side {reference.name!r} did not call after_backward in step {step}")
        run.seconds[reference.name] += total - inner["test_s"]
        run.seconds[test.name] += inner["test_s"] - inner["compare_s"]
        test_values = inner["values"]

        prefix = label(step)
        labels = {"ref_label": reference.name, "test_label": test.name}

        def compare(name: str, ref_value: Any, test_value: Any) -> TensorDiff:
            rel_tol, mean_tol = tolerance(step, name)
            return diff_arrays(f"{prefix}.{name}", ref_value, test_value, rel_tol=rel_tol, mean_tol=mean_tol,
                               **labels)

        rows = [compare(name, value, test_values.losses.get(name, float("nan")))
                for name, value in ref_values.losses.items()]
        rows += inner["gradient_rows"]
        rows += [compare("grad_norm", ref_values.grad_norm, test_values.grad_norm),
                 compare("lr", ref_values.lr, test_values.lr)]
        record = PairedStep(step=step, reference=ref_values, test=test_values, rows=rows)
        if after_step is not None:
            rows += after_step(record)
        run.rows += rows
        run.steps.append(record)
    return run


def value_series(run: LockstepRun, side: str, names: Sequence[str]) -> dict[str, list[float]]:
    """Per name (a loss term, ``grad_norm`` or ``lr``), the values of one side at every step.

    ``side`` is ``"reference"`` or ``"test"``.
    """
    series: dict[str, list[float]] = {name: [] for name in names}
    for record in run.steps:
        values: StepValues = getattr(record, side)
        for name in names:
            series[name].append({"grad_norm": values.grad_norm, "lr": values.lr}.get(name, values.losses.get(name)))
    return series
