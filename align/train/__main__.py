"""``python -m align.train``: K training iterations on the tiny COCO; exit status 1 when it fails, 2 on bad input."""
from __future__ import annotations

import sys

from align.engine.cli import options_parser
from align.engine.options import options_from
from align.ghm.pair import extra_dtype
from align.ghm.suite import run_stage
from align.train.stage import STAGE, TrainOptions, first_divergence, run_train


def main(argv: list[str] | None = None) -> int:
    args = options_parser("train", __doc__, TrainOptions).parse_args(argv)
    opts = options_from(TrainOptions, args, extra_dtype=extra_dtype(args))

    def run():
        return run_train(opts)

    def summary(result) -> str:
        worst = max(result.tensors, key=lambda t: t.rel_max if t.rel_max == t.rel_max else float("inf"))
        return f"({len(result.tensors)} compared; worst {worst.name}: rel {worst.rel_max:.2e})"

    return run_stage(run, label=lambda r: f"train ({r.meta['dtype']})", summary=summary, details=_details,
                     first_divergence=first_divergence, verbose=args.verbose, report=opts.reports / (STAGE + ".html"))


def _details(result) -> list[str]:
    lines = []
    for title, _, rows in result.extra_tables:
        if not title.startswith("Loss per iteration"):
            continue
        lines.append(title)
        for r in rows:
            lines.append(f"  iter {r.iter:>3} (epoch {r.epoch}, images {r.images}, flips {r.flips}): lr {r.lr:.3e} "
                         f"loss mmdet {r.mmdet_loss:.6f} paddle {r.paddle_loss:.6f} rel {r.loss_rel_diff:.1e}; "
                         f"grad norm {r.grad_norm_mmdet:.4f} / {r.grad_norm_paddle:.4f} rel {r.grad_norm_rel_diff:.1e}")
    for dtype, run in result.meta["runs"].items():
        lines.append(f"{dtype} ({run['role']}): worst loss rel {run['worst_loss_rel_diff']:.2e} "
                     f"(iteration {run['worst_loss_rel_diff_iteration']}), worst grad norm rel "
                     f"{run['worst_grad_norm_rel_diff']:.2e} (iteration {run['worst_grad_norm_rel_diff_iteration']}); "
                     f"first GHM bin count difference: {run['first_ghm_bin_count_difference'] or 'none'}; "
                     f"mmdet {run['mmdet_s']:.1f} s, paddle {run['paddle_s']:.1f} s")
    return lines


if __name__ == "__main__":
    sys.exit(main())
