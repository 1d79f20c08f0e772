"""The backward stage's one run: two training sides of any pair in lockstep, compared at every step.

A client hands the stage a `TrainingPair`: the GHM RetinaNet (`align.ghm.backward`, the
default of ``python -m align.backward``), or any two models that functions build
(`align.pair.training`, ``--torch module:function --paddle module:function``). For each
precision the pair asks for (the checked one first, then an informational one), `train_run`

1. makes the pair's two sides (`RunSides`): the reference side live, recorded into the
   reference cache as it trains, or replayed from it (`align.engine.replay`), and the Paddle
   side, always live;
2. trains both on the pair's batches with `align.engine.paired.train_in_lockstep`,
   comparing every step's loss terms, gradient norm before clipping and learning rate,
   every gradient at step 1, and every parameter and every optimizer state group (momentum,
   Adam moments, the pair's own state) after the last step, under the Paddle side's names;
3. lets the pair's `Diagnostics` look at each step (the ReLU census here; the GHM client
   adds its bin flips) and gather the rounding-level causes of each step's first
   disagreement (`align.engine.divergence`);
4. keeps the per-step figures (`PairRun.steps`), the reprod_log arrays and the parameters'
   change over the run.

`align.backward.stage.run_backward` turns the runs into the report.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any, ContextManager, Optional, Protocol, Sequence

import numpy as np

from align.backward.records import PairRun
from align.engine.capture import ReluMaskCensus
from align.engine.cli import progress
from align.engine.compare import TensorDiff, compare_named, to_numpy, worst_named, worst_of
from align.engine.divergence import Explanation, StepEvidence, classify, relu_flips
from align.engine.paired import PairedStep, train_in_lockstep
from align.engine.replay import ReplaySide
from align.engine.weights import NameMap
from align.forward.stage import layer_scaled


@dataclass(frozen=True)
class Bounds:
    """Relative bounds of one run's rows (max|diff| / max|reference|).

    ``mean``: the loss, gradient and state rows also bound the mean absolute difference by
    the same figure (the GHM stage's rule); False bounds the relative difference only, as a
    model whose scale is unknown needs.
    """

    grad: float  # every gradient at step 1
    loss_first: float  # loss terms and gradient norm at step 1
    loss: float  # the same after step 1
    state: float  # parameters and optimizer state after the last step
    lr: float  # learning rate per step
    mean: bool = True
    # A failed gradient, parameter or state row passes when its max|diff| is within its bound of
    # the largest value of the same kind in its layer (`align.forward.stage.layer_scaled`): a
    # tensor that is zero in exact arithmetic (an attention key projection's bias, its gradient
    # and moments) holds rounding noise on both sides, whose relative difference means nothing.
    layer_scaled: bool = False

    def rel_mean(self, tol: float) -> tuple[float, float]:
        """``(rel_tol, mean_tol)`` of a row bounded by ``tol``."""
        return tol, tol if self.mean else math.inf


@dataclass
class RunSides:
    """The two sides of one run as the pair made them.

    Attributes:
        reference: the torch side (`align.engine.paired.Side`: live, recording or `ReplaySide`).
        test: the Paddle side.
        reference_model: the torch model, None when the side is replayed.
        test_model: the Paddle model.
        clip: the clipping bound of both sides (None: no clipping).
        cache: how the reference side was obtained ("off", "miss", "mismatch", "fresh", "hit", ...).
        check_s: seconds spent reading and checking it in the cache.
    """

    reference: Any
    test: Any
    reference_model: Any
    test_model: Any
    clip: Optional[float]
    cache: str = "off"
    check_s: float = 0.0


class MappedCensus(ReluMaskCensus):
    """`ReluMaskCensus` with torch's layer names taken through ``name_map`` to Paddle's."""

    def __init__(self, torch_model, paddle_model, name_map: NameMap):
        self._name_map = name_map
        super().__init__(torch_model, paddle_model)

    def _torch_hook(self, name: str):
        return super()._torch_hook(self._name_map.layer(name))


class Diagnostics:
    """Per-step diagnostics of a run: the ReLU mask census of both models and its flips as the
    rounding-level cause of a step's disagreement. A client adds its own causes by overriding
    the methods and calling these.

    The census pairs ``nn.ReLU`` calls by layer name (torch's through ``name_map``) and call
    index, so it runs when every Paddle ReLU layer has a torch one of that name (a replayed
    reference: when its recording holds masks); otherwise no step has a ReLU cause.

    ``step_fields``: ``(field, column title)`` of the cells `after_step` returns, in order.
    """

    step_fields: Sequence[tuple[str, str]] = (("relu_flips", "ReLU mask flips"),)

    def __init__(self, name_map: Optional[NameMap] = None):
        self.census: Optional[ReluMaskCensus] = None
        self.relu_layers: dict[str, list] = {}
        self.name_map = name_map or NameMap()
        self._test_model = None

    def attach(self, sides: RunSides) -> None:
        """Both models exist (the torch one unless replayed): hooks go on them."""
        import paddle
        import torch

        self._test_model = sides.test_model
        if sides.reference_model is None:
            return  # decided by the recording, at the first step
        torch_relus = {self.name_map.layer(n) for n, m in sides.reference_model.named_modules()
                       if isinstance(m, torch.nn.ReLU)}
        paddle_relus = {n for n, m in sides.test_model.named_sublayers() if isinstance(m, paddle.nn.ReLU)}
        # A torch ReLU that is never called (mmdet's RetinaHead has one) has no Paddle counterpart.
        if paddle_relus and paddle_relus <= torch_relus:
            self.census = MappedCensus(sides.reference_model, sides.test_model, self.name_map)

    def reference_extras(self) -> dict[str, np.ndarray]:
        """What a recording keeps per step of what the hooks saw of the reference's forward pass."""
        if self.census is None:
            return {}
        return {f"relu/{key}": mask for key, mask in self.census.reference_masks().items()}

    def before_step(self, step: int, recorded: Optional[dict[str, np.ndarray]]) -> None:
        """Begin step ``step``; ``recorded``: the replayed reference's arrays of the step."""
        masks = None if recorded is None else {name[len("relu/"):]: a for name, a in recorded.items()
                                               if name.startswith("relu/")}
        if step == 1 and masks:
            self.census = MappedCensus(None, self._test_model, self.name_map)
        if self.census is not None:
            self.census.start_step(masks)

    def after_step(self, step: int) -> tuple[list[Explanation], list[Any]]:
        """The step's causes and its cells (one per `step_fields`), after both updates."""
        if self.census is None:
            return [], [None]  # not counted: an empty cell
        flips = self.census.finish_step()
        if step == 1:
            self.relu_layers = {name: list(row) for name, row in self.census.layers.items()}
        cause = relu_flips(self.census.step_layers)
        return [cause] if cause is not None else [], [flips]

    def close(self) -> None:
        if self.census is not None:
            self.census.remove()


@dataclass
class Extras:
    """What a client adds to the stage's report after its runs (`TrainingPair.finish`)."""

    rows: list = field(default_factory=list)  # checked rows after the runs' rows
    layers: list = field(default_factory=list)  # checked layer rows (isolated layers)
    tables: list = field(default_factory=list)  # after the ReLU census table
    late_tables: list = field(default_factory=list)  # at the end
    meta: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)


class TrainingPair(Protocol):
    """What a client hands the backward stage: two training sides and what to train them on."""

    stage: str  # the report's name
    title: str
    reference: str  # the reference side's name in the report ("mmdet", "torch")
    total: str  # the loss term the per-step table and the figure show ("loss.total", "loss")
    dtypes: Sequence[str]  # the checked precision, then an informational one if any
    state_labels: dict[str, str]  # optimizer state group -> its label in the report, in order
    steps: int
    meta: dict  # what the report records of the pair and its settings
    # An unexplained first disagreement of the informational run fails the stage too.
    informational_decides: bool

    def bounds(self, dtype: str) -> Bounds:
        """The bounds of a run in ``dtype``."""

    def batches(self, dtype: str) -> list[tuple[Any, Any]]:
        """Per step, (the reference's batch, the Paddle side's batch)."""

    def diagnostics(self, dtype: str) -> Diagnostics:
        """A new `Diagnostics` for a run."""

    def sides(self, dtype: str, diagnostics: Diagnostics) -> ContextManager[RunSides]:
        """Both sides of a run, inside a ``with`` block; a recording reference side keeps
        ``diagnostics.reference_extras()`` with each step (an entry only when the block ends
        without an exception)."""

    def finish(self, runs: list[PairRun]) -> Extras:
        """The client's own rows, tables and meta, once every run is done."""

    def write_report(self, result, reports):
        """Write the stage's JSON and HTML report (and the index)."""


def step_row_type(reference: str, state_labels: dict[str, str], fields: Sequence[tuple[str, str]]):
    """The per-step row type of a run and its column titles (differences are Paddle vs the
    reference; the worst gradient, parameter and state differences are informational after step 1)."""
    columns = [("step", "step"), ("lr", "lr"), (f"loss_{reference}", f"loss {reference}"),
               ("loss_paddle", "loss paddle"), ("loss_rel", "loss rel"),
               (f"grad_norm_{reference}", f"grad norm {reference}"), ("grad_norm_paddle", "grad norm paddle"),
               ("grad_norm_rel", "grad norm rel"), ("clipped", "clipped"), ("worst_grad_rel", "worst grad rel"),
               ("worst_grad", "worst grad"), ("worst_param_rel", "worst param rel (after step)"),
               ("worst_param", "worst param")]
    columns += [(f"worst_{group}_rel", f"worst {label} rel (after step)") for group, label in state_labels.items()]
    columns += list(fields)
    return collections.namedtuple("StepRow", [f for f, _ in columns]), [title for _, title in columns]


def train_run(pair: TrainingPair, dtype: str, *, keep_logs: bool) -> PairRun:
    """One run of both sides in ``dtype`` (see the module docstring)."""
    bounds = pair.bounds(dtype)
    batches = pair.batches(dtype)
    diagnostics = pair.diagnostics(dtype)
    with pair.sides(dtype, diagnostics) as sides:
        initial = {n: to_numpy(v).astype(np.float64) for n, v in sides.test.parameters().items()}
        diagnostics.attach(sides)
        try:
            run, steps, causes, logs = _lockstep(pair, dtype, bounds, sides, diagnostics, batches, keep_logs)
        finally:
            diagnostics.close()
        final = sides.reference.parameters()
        changes = [(float(np.abs(to_numpy(final[n]).astype(np.float64) - v).max()), float(np.abs(v).max()))
                   for n, v in initial.items() if n in final and v.size]
    evidence = [StepEvidence(r.step, [row.name for row in r.rows if not row.passed], causes.get(r.step, []))
                for r in run.steps]
    # Relative to each tensor's largest initial magnitude: how far the run moved the
    # weights on the scale the parameter rows are compared on.
    relative = [change / scale for change, scale in changes if scale > 0]
    groups = tuple(pair.state_labels)
    _, columns = step_row_type(pair.reference, pair.state_labels, diagnostics.step_fields)
    return PairRun(dtype=dtype, rows=run.rows, steps=steps, relu_layers=diagnostics.relu_layers,
                   largest_change=max((c for c, _ in changes), default=0.0),
                   relative_change=(float(np.median(relative)), max(relative)) if relative else (0.0, 0.0),
                   seconds={f"{pair.reference}_s": run.seconds[sides.reference.name],
                            "paddle_s": run.seconds[sides.test.name]},
                   logs=logs, divergences=classify(evidence, lambda name: row_kind(name, groups)),
                   reference_cache=sides.cache, reference_check_s=sides.check_s, bounds=bounds,
                   losses=([s[2] for s in steps], [s[3] for s in steps]), step_columns=columns)


def row_kind(name: str, groups: Sequence[str] = ()) -> str:
    """The kind of a row for `align.engine.divergence.classify`: ``gradient`` (step 1's
    gradients, the gradient norm), ``state`` (parameters and optimizer state after the
    update), ``lr`` or ``loss``."""
    head, _, rest = name.partition(".")
    if head == "grad" or rest == "grad_norm":
        return "gradient"
    if head == "param" or head in groups:
        return "state"
    return "lr" if rest == "lr" else "loss"


def _lockstep(pair: TrainingPair, dtype: str, bounds: Bounds, sides: RunSides, diagnostics: Diagnostics,
              batches: list, keep_logs: bool):
    """The paired steps of `train_run` with their comparisons; returns the `LockstepRun`, the
    per-step rows, the causes found per step and the reprod_log dicts."""
    ref, test = sides.reference, sides.test
    groups = list(pair.state_labels)
    row_type, _ = step_row_type(pair.reference, pair.state_labels, diagnostics.step_fields)
    causes: dict[int, list[Explanation]] = {}
    logs = ({}, {}) if keep_logs else None
    grad_logs: Optional[tuple[dict, dict]] = ({}, {}) if keep_logs else None
    worst_grad: dict[int, tuple[float, str]] = {}
    steps: list = []
    last = len(batches)

    def scaled(rows: list[TensorDiff], tol: float, what: str) -> list[TensorDiff]:
        return layer_scaled(rows, tol, what) if bounds.layer_scaled else rows

    def tolerance(step: int, name: str) -> tuple[float, float]:
        return bounds.rel_mean(bounds.lr if name == "lr" else bounds.loss_first if step == 1 else bounds.loss)

    def at_gradients(step: int) -> list[TensorDiff]:
        # Every step's worst gradient difference is reported; step 1's are also checked one by one.
        if step > 1:
            worst_grad[step] = worst_named("grad", ref.gradients(), test.gradients())
            return []
        rows = scaled(compare_named("grad", ref.gradients(), test.gradients(), bounds.grad, grad_logs,
                                    mean_tol=bounds.rel_mean(bounds.grad)[1]), bounds.grad, "gradient")
        worst_grad[step] = worst_of(rows)
        return rows

    def before_step(step: int) -> None:
        diagnostics.before_step(step, ref.extras(step) if isinstance(ref, ReplaySide) else None)

    def after_step(record: PairedStep) -> list[TensorDiff]:
        step = record.step
        causes[step], cells = diagnostics.after_step(step)
        if logs is not None:
            _log_step(logs, grad_logs if step == 1 else None, record)
        ref_state, test_state = ref.state(), test.state()
        rows: list[TensorDiff] = []
        if step == last:
            mean_tol = bounds.rel_mean(bounds.state)[1]
            param_rows = scaled(compare_named("param", ref.parameters(), test.parameters(), bounds.state, logs,
                                              mean_tol=mean_tol), bounds.state, "parameter")
            rows += param_rows
            worst_param, worst_state = worst_of(param_rows), []
            for group in groups:
                group_rows = scaled(compare_named(group, ref_state.get(group, {}), test_state.get(group, {}),
                                                  bounds.state, logs, mean_tol=mean_tol), bounds.state, group)
                rows += group_rows
                worst_state.append(worst_of(group_rows)[0])
        else:
            worst_param = worst_named("param", ref.parameters(), test.parameters())
            worst_state = [worst_named(g, ref_state.get(g, {}), test_state.get(g, {}))[0] for g in groups]
        by_name = {row.name: row for row in record.rows}
        total, norm = by_name.get(f"step{step}.{pair.total}"), by_name[f"step{step}.grad_norm"]
        grad = worst_grad[step]
        steps.append(row_type(
            step, record.reference.lr, float(record.reference.losses[pair.total]),
            float(record.test.losses.get(pair.total, math.nan)), total.rel_max if total else math.nan,
            record.reference.grad_norm, record.test.grad_norm, norm.rel_max,
            sides.clip is not None and record.reference.grad_norm > sides.clip, grad[0], grad[1][len("grad."):],
            worst_param[0], worst_param[1][len("param."):], *worst_state, *cells))
        return rows

    run = train_in_lockstep(ref, test, [(r, t) for r, t in batches], label=lambda step: f"step{step}",
                            tolerance=tolerance, at_gradients=at_gradients, before_step=before_step,
                            after_step=after_step,
                            progress=lambda items: progress(items, f"{pair.stage} {dtype}", total=len(batches)))
    return run, steps, causes, logs


def _log_step(logs: tuple[dict, dict], grad_logs: Optional[tuple[dict, dict]], record: PairedStep) -> None:
    """A step's compared values into the reprod_log dicts, in row order."""
    prefix = f"step{record.step}."
    for name, value in record.reference.losses.items():
        logs[0][prefix + name] = np.float64(value)
        logs[1][prefix + name] = np.float64(record.test.losses.get(name, math.nan))
    if grad_logs is not None:
        logs[0].update(grad_logs[0])
        logs[1].update(grad_logs[1])
    for name in ("grad_norm", "lr"):
        logs[0][prefix + name] = np.float64(getattr(record.reference, name))
        logs[1][prefix + name] = np.float64(getattr(record.test, name))
