"""``python -m align.backward``: training steps of mmdet's GHM RetinaNet and ours in lockstep, or of any
two models that functions build (``--torch module:function --paddle module:function [--optimizer
sgd|momentum|adam|adamw] [--loss module:factory]``); exit status 0 PASS, 1 FAIL, 2 bad input (one line
naming it)."""
from __future__ import annotations

import sys

from align.backward.records import BackwardOptions
from align.backward.stage import first_divergence, run_backward
from align.engine.cli import options_parser, parse_shape
from align.engine.options import options_from
from align.engine.report import format_number
from align.ghm.pair import extra_dtype
from align.ghm.suite import run_stage

PAIR_SHAPE = "2x3x32x32"
# A pair's default learning rate: sum(output * R) has no minimum, and a larger step sends a deep
# network's loss far from where it started within a few steps.
PAIR_LR = 1e-3
# A pair's default weight decay: the configuration's.
PAIR_WEIGHT_DECAY = 1e-4
PAIR_ONLY = ("map", "--map"), ("name", "--name"), ("optimizer", "--optimizer"), ("weight_decay", "--weight-decay"), \
    ("loss", "--loss"), ("inputs", "--inputs"), ("input", "--input")
GHM_ONLY = ("warmup_iters", "--warmup-iters"), ("isolate", "--isolate")


def training_pair(opts: BackwardOptions):
    """The pair two builders make (``--torch``, ``--paddle``), every option checked before any
    model is built; None for the GHM RetinaNet, the default."""
    if not (opts.torch or opts.paddle):
        for field, flag in PAIR_ONLY:
            if getattr(opts, field) is not None:
                raise ValueError(f"{flag} is for a pair of --torch and --paddle builders")
        for flag, given in (("--no-carry", not opts.carry), ("--positional", opts.positional)):
            if given:
                raise ValueError(f"{flag} is for a pair of --torch and --paddle builders")
        return None
    from align.pair.inputs import one_way
    from align.pair.optimizers import OptimizerSettings
    from align.pair.run import build, builder_pair, load_builder
    from align.pair.training import BuilderTraining

    if not (opts.torch and opts.paddle):
        raise ValueError("--torch and --paddle come together: each names the builder of one side")
    if opts.ckpt:
        raise ValueError(f"--ckpt {opts.ckpt}: the mmdet checkpoint of the GHM RetinaNet; with --torch and "
                         "--paddle the builders load the weights")
    for field, flag in GHM_ONLY:
        if getattr(opts, field) not in (None, False):
            raise ValueError(f"{flag} is for the GHM RetinaNet, not a pair of --torch and --paddle builders")
    settings = OptimizerSettings(opts.optimizer or "momentum", lr=opts.lr or PAIR_LR,
                                 weight_decay=PAIR_WEIGHT_DECAY if opts.weight_decay is None else opts.weight_decay,
                                 clip=opts.clip_max_norm)
    if opts.loss:
        load_builder(opts.loss, "--loss")
    one_way(opts.shape, opts.input, opts.inputs)
    name = opts.name or "pair_backward"
    # The inputs as the forward stage takes them; the models' weights converted as it converts them.
    pair = builder_pair(opts.torch, opts.paddle, name_map_file=opts.map, carry=opts.carry,
                        shape=parse_shape(opts.shape or PAIR_SHAPE), seed=opts.seed, stage=name, spill=False,
                        input_specs=opts.input or (), inputs_file=opts.inputs, positional=opts.positional)
    dtypes = [opts.dtype] + ([opts.extra_dtype] if opts.extra_dtype not in (None, opts.dtype) else [])
    return BuilderTraining(pair, settings, steps=opts.steps, dtypes=dtypes, loss=opts.loss, seed=opts.seed,
                           cache_dir=opts.build_dir / "cache" if opts.cache else None, fresh=opts.fresh,
                           input_specs=opts.input or (), inputs_file=opts.inputs,
                           paddle_builder=lambda dtype: build(opts.paddle, "--paddle", dtype))


def main(argv: list[str] | None = None) -> int:
    args = options_parser("backward", __doc__.split("\n\n")[0], BackwardOptions).parse_args(argv)
    opts = options_from(BackwardOptions, args, extra_dtype=extra_dtype(args),
                        paddle_threads=args.paddle_threads or _torch_threads())
    name = opts.name or ("pair_backward" if opts.torch else "backward")

    def summary(result) -> str:
        h, replayed = result.headline, result.meta["reference_cache"] == "hit"
        reference = next(iter(result.seconds))
        return (f"({len(result.tensors)} compared over {result.meta['steps']} steps; {h.label} {h.value:.2e} at "
                f"{h.where}); {reference} {result.seconds[reference]:.1f} s"
                f"{' (replayed from the cache)' if replayed else ''}, paddle {result.seconds['paddle']:.1f} s")

    return run_stage(lambda: run_backward(opts, training_pair(opts)),
                     label=lambda r: f"{r.stage} ({r.meta['dtype']})", summary=summary, details=_details,
                     first_divergence=first_divergence, verbose=args.verbose, report=opts.reports / f"{name}.html")


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _details(result) -> list[str]:
    lines = []
    for title, columns, rows in result.extra_tables:
        if title.startswith("Per step"):
            lines.append(title)
            for r in rows:
                lines.append(f"  step {r[0]:>3}: " + ", ".join(f"{c} {format_number(v)}"
                                                            for c, v in zip(columns[1:], r[1:])))
    lines.append("Worst difference per category:")
    for r in result.extra_tables[0].rows:
        lines.append(f"  {r.run} {r.category:44s} {r.worst_rel:.2e} (tol {r.tolerance:.0e}, "
                     f"{'ok' if r.within else 'OVER'}) {r.worst_tensor}")
    schedule = result.meta.get("lr_schedule")
    if schedule:
        lines.append(f"learning rate over the whole schedule ({schedule['iterations']} iterations, "
                     f"{schedule['iters_per_epoch']} per epoch): max abs diff {schedule['max_abs_diff']:.1e}, "
                     f"{schedule['iterations_not_bitwise_equal']} iterations not bit-for-bit equal")
    reference = next(iter(result.seconds))
    relative = result.meta[f"parameter_change_relative_{reference}"]
    lines.append(f"parameter change over the run ({reference}, {result.meta['dtype']}, base lr "
                 f"{result.meta['base_lr']:g}): largest {result.meta[f'largest_parameter_change_{reference}']:.3e}; "
                 f"relative to each tensor's largest value: median {relative['median']:.2e}, "
                 f"max {relative['max']:.2e}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
