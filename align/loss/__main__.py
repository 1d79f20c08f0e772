"""``python -m align.loss``: loss alignment; exit status 1 when it fails."""
from __future__ import annotations

import sys

from common.arguments import non_negative_float, positive, tensor_shape
from align.engine.cli import stage_parser
from align.ghm.pair import BUILD_DIR
from align.ghm.suite import run_stage
from align.loss.stage import DEFAULT_SHAPE, LossOptions, first_divergence, run_loss


def main(argv: list[str] | None = None) -> int:
    p = stage_parser("loss", __doc__, ckpt_help="mmdet checkpoint (default: the seeded synthetic one)",
                     build_dir=BUILD_DIR)
    p.add_argument("--shape", type=tensor_shape(4, channels=3), default=DEFAULT_SHAPE, help="batch 2x3xHxW (default %(default)s)")
    p.add_argument("--iters", type=positive, default=4, help="loss calls in a row (5 GHM calls each)")
    p.add_argument("--rel-tol", type=non_negative_float, default=1e-6)
    p.add_argument("--mean-tol", type=non_negative_float, default=1e-6)
    p.add_argument("--loss-rel-tol", type=non_negative_float, default=5e-6,
                   help="relative bound on loss terms (mmdet's float32 sums are off ~1e-6)")
    args = p.parse_args(argv)
    opts = LossOptions(ckpt=args.ckpt, shape=args.shape, seed=args.seed, iters=args.iters,
                       rel_tol=args.rel_tol, mean_tol=args.mean_tol, loss_rel_tol=args.loss_rel_tol,
                       reports=args.reports, build_dir=args.build_dir)

    def summary(result) -> str:
        worst, m = max(result.tensors, key=lambda t: t.rel_max), result.meta
        return (f"({len(result.tensors)} compared; worst {worst.name}: rel {worst.rel_max:.2e}; "
                f"time in the loss over {opts.iters} iterations: mmdet {m['mmdet_loss_s']:.2f} s, "
                f"paddle {m['paddle_loss_s']:.2f} s)")

    return run_stage(lambda: run_loss(opts), label=lambda r: "loss", summary=summary,
                     first_divergence=first_divergence, verbose=args.verbose, report=opts.reports / "loss.html")


if __name__ == "__main__":
    sys.exit(main())
