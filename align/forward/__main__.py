"""``python -m align.forward``: forward alignment; exit status 1 when it fails."""
from __future__ import annotations

import sys

from common.arguments import non_negative_float, positive_float, tensor_shape
from align.engine.cli import stage_parser
from align.forward.stage import DEFAULT_SHAPE, ForwardOptions, first_divergence, run_forward
from align.ghm.pair import BUILD_DIR
from align.ghm.suite import run_stage


def main(argv: list[str] | None = None) -> int:
    p = stage_parser("forward", __doc__, ckpt_help="mmdet checkpoint (default: the seeded synthetic one)",
                     build_dir=BUILD_DIR, build_dir_help="where the default checkpoint and conversions are cached",
                     cache=True)
    p.add_argument("--shape", type=tensor_shape(4, channels=3), default=DEFAULT_SHAPE, help="input NxCxHxW (default %(default)s)")
    p.add_argument("--perturb", help="Paddle parameter to perturb, e.g. backbone.layer3.2.conv2.weight")
    p.add_argument("--perturb-scale", type=positive_float, default=1e-3)
    p.add_argument("--rel-tol", type=non_negative_float, default=1e-5)
    p.add_argument("--mean-tol", type=non_negative_float, default=1e-5)
    p.add_argument("--no-layers", action="store_true", help="skip the layer-by-layer capture")
    p.add_argument("--isolate", action="store_true",
                   help="also every layer on mmdet's recorded input: each layer's own error")
    args = p.parse_args(argv)
    opts = ForwardOptions(ckpt=args.ckpt, shape=args.shape, seed=args.seed, perturb=args.perturb,
                          perturb_scale=args.perturb_scale, rel_tol=args.rel_tol,
                          mean_tol=args.mean_tol, reports=args.reports, layers=not args.no_layers,
                          isolate=args.isolate, cache=args.cache, fresh=args.fresh, build_dir=args.build_dir)

    def summary(result) -> str:
        worst = max(result.tensors, key=lambda t: t.rel_max)
        return (f"({len(result.tensors)} outputs, {len(result.layers)} layer calls; "
                f"worst output {worst.name}: rel {worst.rel_max:.2e}, mean {worst.mean_abs:.2e})")

    return run_stage(lambda: run_forward(opts), label=lambda r: "forward", summary=summary,
                     first_divergence=first_divergence, verbose=args.verbose, report=opts.reports / "forward.html")


if __name__ == "__main__":
    sys.exit(main())
