"""``python -m align.pair``: align a torch module and a Paddle layer that your own functions build.

    python -m align.pair --torch pkg.module:build_torch --paddle pkg.module:build_paddle \
        [--map names.json] [--isolate] [--backward] [--shape 2x3x224x224]

Each builder is called without arguments and returns the model (in the mode
to compare: ``eval()`` for inference). Weights go from the torch model to the
Paddle one by name (``--map``: prefix rules, see `align.engine.weights`).
Exit status: 0 PASS, 1 FAIL, 2 bad input (one line naming it).
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

from align.engine.cli import options_parser, parse_shape, run_stage
from align.engine.compare import first_failed_name
from align.engine.options import build_dir_option, option, options_from, reports_option, seed_option
from align.engine.weights import NameMap
from common.arguments import non_negative_float, positive_float, tensor_shape


def load_builder(spec: str, flag: str):
    """``"pkg.module:function"`` -> the function; a bad spec is a ``ValueError`` naming the option."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{flag} {spec!r}: expected module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{flag} {spec!r}: cannot import {module_name} ({err})") from None
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise ValueError(f"{flag} {spec!r}: {module_name} has no function {attr}")
    return builder


def build(spec: str, flag: str):
    """The model the builder named by ``spec`` returns; a builder that raises is a ``ValueError``
    naming ``module:function`` and its exception (the traceback with ``-v``)."""
    builder = load_builder(spec, flag)
    try:
        return builder()
    except Exception as err:
        raise ValueError(f"{flag} {spec}: the builder raised {type(err).__name__}: {err}") from err


@dataclass
class PairOptions:
    torch: str = option(None, "module:function building the reference torch module", required=True)
    paddle: str = option(None, "module:function building the Paddle layer", required=True)
    map: Path | None = option(None, "JSON name map {\"prefixes\": [[torch, paddle], ...]}", type=Path)
    shape: str = option("2x3x224x224", "input NxCxHxW (default %(default)s)", type=tensor_shape())
    seed: int = seed_option()
    isolate: bool = option(False, "also compare every layer in isolation")
    backward: bool = option(False, "also compare gradients")
    carry: bool = option(True, "the builders load equal weights themselves", flag="--no-carry")
    perturb: str | None = option(None, "Paddle parameter to perturb (the report must name its layer)")
    perturb_scale: float = option(1e-3, "the perturbation's std over the parameter's (default %(default)s)",
                                  type=positive_float)
    rel_tol: float = option(1e-5, "bound on max|diff| / max|ref| (default %(default)s)", type=non_negative_float)
    mean_tol: float = option(1e-5, "bound on mean|diff| (default %(default)s)", type=non_negative_float)
    spill: bool = option(False, "keep recorded activations on disk, not in memory")
    name: str = option("pair", "report file stem (default %(default)s)")
    reports: Path = reports_option()
    build_dir: Path = build_dir_option(Path("build"), "where --spill keeps the recorded activations "
                                                     "(default %(default)s)")


def main(argv: list[str] | None = None) -> int:
    args = options_parser("pair", __doc__.split("\n\n")[0], PairOptions).parse_args(argv)
    opts = options_from(PairOptions, args)

    def run():
        import numpy as np

        from align.pair.run import align_pair

        name_map = NameMap.from_json(opts.map) if opts.map else NameMap()
        torch_model = build(opts.torch, "--torch")
        paddle_model = build(opts.paddle, "--paddle")
        inputs = np.random.default_rng(opts.seed).standard_normal(parse_shape(opts.shape)).astype(np.float32)
        return align_pair(torch_model, paddle_model, inputs, name_map=name_map, isolate=opts.isolate,
                          backward=opts.backward, carry=opts.carry, seed=opts.seed, rel_tol=opts.rel_tol,
                          mean_tol=opts.mean_tol, perturb=opts.perturb, perturb_scale=opts.perturb_scale,
                          spill=opts.spill, reports=opts.reports, build_dir=opts.build_dir, stage=opts.name)

    def summary(result) -> str:
        h = result.headline
        return (f"({len(result.tensors)} outputs, {len(result.layers)} layer rows; "
                f"{h.label} {h.value:.2e} at {h.where})" if h else f"({len(result.tensors)} compared)")

    return run_stage(run, label=lambda r: opts.name, summary=summary,
                     first_divergence=lambda r: first_failed_name(r.layers, r.tensors),
                     verbose=args.verbose, report=opts.reports / f"{opts.name}.html")


if __name__ == "__main__":
    sys.exit(main())
