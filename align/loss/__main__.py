"""``python -m align.loss``: loss alignment; exit status 1 when it fails."""
from __future__ import annotations

import sys

from align.engine.cli import options_parser
from align.engine.options import options_from
from align.ghm.suite import run_stage
from align.loss.stage import LossOptions, first_divergence, run_loss


def main(argv: list[str] | None = None) -> int:
    args = options_parser("loss", __doc__, LossOptions).parse_args(argv)
    opts = options_from(LossOptions, args)

    def summary(result) -> str:
        worst, m = max(result.tensors, key=lambda t: t.rel_max), result.meta
        return (f"({len(result.tensors)} compared; worst {worst.name}: rel {worst.rel_max:.2e}; "
                f"time in the loss over {opts.iters} iterations: mmdet {m['mmdet_loss_s']:.2f} s, "
                f"paddle {m['paddle_loss_s']:.2f} s)")

    return run_stage(lambda: run_loss(opts), label=lambda r: "loss", summary=summary,
                     first_divergence=first_divergence, verbose=args.verbose, report=opts.reports / "loss.html")


if __name__ == "__main__":
    sys.exit(main())
