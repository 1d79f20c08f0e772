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
from pathlib import Path

from common.arguments import non_negative_float, positive_float, tensor_shape
from align.engine.cli import parse_shape, run_stage, stage_parser
from align.engine.compare import first_failed_name
from align.engine.weights import NameMap


def load_builder(spec: str, option: str):
    """``"pkg.module:function"`` -> the function; a bad spec is a ``ValueError`` naming the option."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{option} {spec!r}: expected module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{option} {spec!r}: cannot import {module_name} ({err})") from None
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise ValueError(f"{option} {spec!r}: {module_name} has no function {attr}")
    return builder


def build(spec: str, option: str):
    """The model the builder named by ``spec`` returns; a builder that raises is a ``ValueError``
    naming ``module:function`` and its exception (the traceback with ``-v``)."""
    builder = load_builder(spec, option)
    try:
        return builder()
    except Exception as err:
        raise ValueError(f"{option} {spec}: the builder raised {type(err).__name__}: {err}") from err


def main(argv: list[str] | None = None) -> int:
    p = stage_parser("pair", __doc__.split("\n\n")[0], ckpt_help="not used (the builders load their weights)",
                     build_dir=Path("build"), build_dir_help="where --spill keeps the recorded activations")
    p.add_argument("--torch", required=True, help="module:function building the reference torch module")
    p.add_argument("--paddle", required=True, help="module:function building the Paddle layer")
    p.add_argument("--map", type=Path, help="JSON name map {\"prefixes\": [[torch, paddle], ...]}")
    p.add_argument("--shape", type=tensor_shape(), default="2x3x224x224", help="input NxCxHxW (default %(default)s)")
    p.add_argument("--isolate", action="store_true", help="also compare every layer in isolation")
    p.add_argument("--backward", action="store_true", help="also compare gradients")
    p.add_argument("--no-carry", action="store_true", help="the builders load equal weights themselves")
    p.add_argument("--perturb", help="Paddle parameter to perturb (the report must name its layer)")
    p.add_argument("--perturb-scale", type=positive_float, default=1e-3)
    p.add_argument("--rel-tol", type=non_negative_float, default=1e-5)
    p.add_argument("--mean-tol", type=non_negative_float, default=1e-5)
    p.add_argument("--spill", action="store_true", help="keep recorded activations on disk, not in memory")
    p.add_argument("--name", default="pair", help="report file stem (default %(default)s)")
    args = p.parse_args(argv)

    def run():
        import numpy as np

        from align.pair.run import align_pair

        shape = parse_shape(args.shape)
        name_map = NameMap.from_json(args.map) if args.map else NameMap()
        torch_model = build(args.torch, "--torch")
        paddle_model = build(args.paddle, "--paddle")
        inputs = np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32)
        return align_pair(torch_model, paddle_model, inputs, name_map=name_map, isolate=args.isolate,
                          backward=args.backward, carry=not args.no_carry, seed=args.seed, rel_tol=args.rel_tol,
                          mean_tol=args.mean_tol, perturb=args.perturb, perturb_scale=args.perturb_scale,
                          spill=args.spill, reports=args.reports, build_dir=args.build_dir, stage=args.name)

    def summary(result) -> str:
        h = result.headline
        return (f"({len(result.tensors)} outputs, {len(result.layers)} layer rows; "
                f"{h.label} {h.value:.2e} at {h.where})" if h else f"({len(result.tensors)} compared)")

    return run_stage(run, label=lambda r: args.name, summary=summary,
                     first_divergence=lambda r: first_failed_name(r.layers, r.tensors),
                     verbose=args.verbose, report=args.reports / f"{args.name}.html")


if __name__ == "__main__":
    sys.exit(main())
