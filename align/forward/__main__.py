"""``python -m align.forward``: forward alignment of mmdet's GHM RetinaNet and ours, or of any two
models that functions build (``--torch module:function --paddle module:function [--map names.json]``);
exit status 0 PASS, 1 FAIL, 2 bad input (one line naming it)."""
from __future__ import annotations

import dataclasses
import sys

from align.engine.cli import options_parser, parse_shape
from align.engine.options import options_from
from align.forward.stage import ForwardOptions, first_divergence, run_forward
from align.ghm.suite import run_stage


PAIR_SHAPE = "2x3x224x224"
F64_TOL = 1e-9


def pair_of(opts: ForwardOptions):
    """The pair two builders make (``--torch``, ``--paddle``); None for the GHM RetinaNet, the default."""
    if opts.torch or opts.paddle:
        from align.pair.inputs import one_way
        from align.pair.run import builder_pair

        if not (opts.torch and opts.paddle):
            raise ValueError("--torch and --paddle come together: each names the builder of one side")
        if opts.ckpt:
            raise ValueError(f"--ckpt {opts.ckpt}: the mmdet checkpoint of the GHM RetinaNet; with --torch and "
                             "--paddle the builders load the weights")
        one_way(opts.shape, opts.input, opts.inputs)
        return builder_pair(opts.torch, opts.paddle, name_map_file=opts.map, carry=opts.carry,
                            shape=parse_shape(opts.shape or PAIR_SHAPE), seed=opts.seed, stage=opts.name or "pair",
                            spill=opts.spill, input_specs=opts.input or (), inputs_file=opts.inputs,
                            dtype=opts.dtype, positional=opts.positional)
    for flag, given in (("--map", opts.map), ("--no-carry", not opts.carry), ("--inputs", opts.inputs),
                        ("--input", opts.input), ("--dtype", opts.dtype != "float32"),
                        ("--positional", opts.positional)):
        if given:
            raise ValueError(f"{flag} is for a pair of --torch and --paddle builders")
    return None


def main(argv: list[str] | None = None, program: str = "forward") -> int:
    """``program``: the name the command line is shown under (``align.pair`` is this command too)."""
    args = options_parser(program, __doc__.split("\n\n")[0], ForwardOptions).parse_args(argv)
    opts = options_from(ForwardOptions, args)
    if opts.dtype == "float64":
        # float64 on both sides leaves only the order of operations: bounds a million times tighter.
        defaults = ForwardOptions()
        opts = dataclasses.replace(
            opts, rel_tol=F64_TOL if opts.rel_tol == defaults.rel_tol else opts.rel_tol,
            mean_tol=F64_TOL if opts.mean_tol == defaults.mean_tol else opts.mean_tol)

    def summary(result) -> str:
        h = result.headline
        return (f"({len(result.tensors)} outputs, {len(result.layers)} layer calls; "
                f"{h.label} {h.value:.2e} at {h.where})" if h else f"({len(result.tensors)} compared)")

    name = opts.name or ("pair" if opts.torch else "forward")
    return run_stage(lambda: run_forward(opts, pair_of(opts)), label=lambda r: r.stage, summary=summary,
                     first_divergence=first_divergence, verbose=args.verbose, report=opts.reports / f"{name}.html")


if __name__ == "__main__":
    sys.exit(main())
