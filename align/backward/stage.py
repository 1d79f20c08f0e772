"""The backward stage of any pair: training steps of both frameworks in lockstep, compared.

A client hands `run_backward` a `align.backward.lockstep.TrainingPair`: the GHM RetinaNet
(`align.ghm.backward.GhmTraining`, the default) or any two models that functions build
(`align.pair.training.BuilderTraining`, ``--torch module:function --paddle module:function``).
For every pair the stage trains the checked run (``dtype``) and an informational one
(``extra_dtype``) with `align.backward.lockstep.train_run`, then writes the same report:

- the rows: every step's loss terms, gradient norm and learning rate, every gradient at
  step 1, every parameter and optimizer state group after the last step, and the client's
  own rows (the GHM client's whole-schedule learning rates);
- the worst row per category, a per-step table per run (with the worst gradient,
  parameter and state differences of every step, so their growth shows), step 1's ReLU
  census, each step's first disagreement and its rounding-level cause, the parameters
  ranked by difference, and the client's tables;
- the loss curves of both runs, reprod_log's files of the checked run, the JSON and HTML.

The verdict: every row within its bound, every isolated layer within its own, and no
first disagreement without a rounding-level cause in the checked run (and in the
informational one for a client that asks, as the GHM client does).
"""
from __future__ import annotations

import math
from typing import Optional

from align.backward.lockstep import Extras, TrainingPair, train_run
from align.backward.records import BackwardOptions
from align.backward.tables import ParameterRow, headline, relu_table, side_run, summarize
from align.engine.compare import first_failed_name
from align.engine.divergence import explained
from align.engine.figures import loss_curves_png
from align.engine.report import StageResult
from align.engine.reprod import reprod_log_diff


def ghm_training(opts: BackwardOptions) -> TrainingPair:
    """The default pair: mmdet's GHM RetinaNet and ours (`align.ghm.backward`)."""
    from align.ghm.backward import GhmTraining

    return GhmTraining(opts)


def run_backward(opts: BackwardOptions, pair: Optional[TrainingPair] = None) -> StageResult:
    """Train ``pair`` (default: the GHM RetinaNet) in each of its precisions, compare, and write
    ``<stage>*`` files into ``opts.reports`` (see the module docstring)."""
    pair = pair or ghm_training(opts)
    runs = [train_run(pair, dtype, keep_logs=opts.reprod_log and k == 0) for k, dtype in enumerate(pair.dtypes)]
    extras: Extras = pair.finish(runs)
    main, ref = runs[0], pair.reference
    bounds = main.bounds
    reprod = reprod_log_diff(main.logs[1], main.logs[0], opts.reports, pair.stage, bounds.loss) if main.logs else {}
    rows = main.rows + extras.rows
    # A run whose first disagreement in some step has no rounding-level cause fails, whatever its precision.
    deciding = runs if pair.informational_decides else runs[:1]
    passed = (all(r.passed for r in rows) and all(r.passed for r in extras.layers)
              and all(explained(run.divergences) for run in deciding))
    summaries = [row for run in runs for row in summarize(run, pair.steps, pair.state_labels)]
    ranked = sorted((r for r in main.rows if r.name.startswith("param.")),
                    key=lambda r: -(math.inf if math.isnan(r.rel_max) else r.rel_max))
    tables = [("Worst difference per category (the first run decides the verdict)",
               ["run", "category", "compared", "worst rel", "worst tensor", "tolerance", "all within"], summaries)]
    for run in runs:
        role = "checked" if run is main else "informational"
        tables.append((f"Per step, {run.dtype} ({role})", run.step_columns, run.steps))
    if any(run.relu_layers for run in runs):
        relu_columns = ["ReLU layer"]
        for run in runs:
            relu_columns += [f"flips {run.dtype}", f"largest |pre-activation| at a flip, {run.dtype}"]
        tables.append(("ReLU mask disagreements at step 1 (elements on in one framework, off in the other)",
                       relu_columns + ["elements"], relu_table(runs)))
    tables += extras.tables
    for run in runs:
        if run.divergences:
            decides = run is main or pair.informational_decides
            tables.append((f"First disagreement per step and its cause, {run.dtype} "
                           f"({'unexplained fails the stage' if decides else 'informational'})",
                           ["step", "first disagreeing row", "verdict", "cause", "elements", "detail"],
                           run.divergences))
    tables.append((f"Parameters ranked by difference after the last step ({main.dtype})",
                   ["parameter", "max abs diff", "rel", "pass"],
                   [ParameterRow(r.name[len("param."):], r.max_abs, r.rel_max, r.passed) for r in ranked[:40]]))

    def change(run) -> dict:
        return {f"largest_parameter_change_{ref}": run.largest_change,
                f"parameter_change_relative_{ref}": dict(zip(("median", "max"), run.relative_change))}

    meta = {
        **pair.meta,
        "dtype": main.dtype,
        "extra_dtype": runs[1].dtype if len(runs) > 1 else None,
        # "hit": the reference side was replayed from build/cache (its time is then only the replay's).
        "reference_cache": main.reference_cache,
        **change(main),
        **{k: round(v, 3) for k, v in main.seconds.items()},
        **extras.meta,
        "runs": {run.dtype: {
            **change(run),
            "relu_mask_flips_step1": sum(r[0] for r in run.relu_layers.values()),
            "reference_cache": run.reference_cache,
            "reference_cache_check_s": round(run.reference_check_s, 3),
            "divergences": {"steps": len(run.divergences),
                            "unexplained": sum(d.verdict == "unexplained" for d in run.divergences),
                            "causes": sorted({d.cause for d in run.divergences})},
            **{k: round(v, 3) for k, v in run.seconds.items()},
            "worst": {row.category: {"rel": row.worst_rel, "tensor": row.worst_tensor, "within": row.within}
                      for row in summaries if row.run == run.dtype},
        } for run in runs},
    }
    labels = ", ".join(pair.state_labels.values())
    figure_extra = (runs[1].dtype, *runs[1].losses) if len(runs) > 1 else None
    return pair.write_report(StageResult(
        stage=pair.stage,
        title=pair.title,
        passed=passed,
        tensors=rows,
        layers=extras.layers,
        thresholds={"precision of the checked run": main.dtype,
                    "step-1 gradients (rel)": bounds.grad,
                    "step-1 losses, grad norm (rel)": bounds.loss_first,
                    "later losses, grad norms (rel)": bounds.loss,
                    f"parameters{', ' + labels if labels else ''} after the last step (rel)": bounds.state,
                    "lr, per step (rel)": bounds.lr,
                    **extras.thresholds},
        meta=meta,
        extra_tables=tables + extras.late_tables,
        figures=[("Total loss per step and relative difference",
                  loss_curves_png(*main.losses, bounds.loss, main.dtype, figure_extra, names=(ref, "paddle"),
                                  step="step"))],
        reprod_log=reprod,
        reprod_log_check=bounds.loss,
        reprod_log_why=("each row is bounded relative to the largest value of its own tensor, by category "
                        "(see thresholds), where reprod_log applies one absolute mean to every tensor"),
        headline=headline(summaries, main.dtype),
        seconds={ref: main.seconds[f"{ref}_s"], "paddle": main.seconds["paddle_s"]},
        side_run=side_run(runs[1], summaries) if len(runs) > 1 else "",
    ), opts.reports)


def first_divergence(result: StageResult) -> str | None:
    """The first failed row of the training runs, else of the isolated layers."""
    return first_failed_name(result.tensors, result.layers)
