"""``python -m align.train``: K training iterations on the tiny COCO; exit status 1 when it fails, 2 on bad input."""
from __future__ import annotations

import sys

from align.engine.cli import stage_parser
from align.ghm.pair import BUILD_DIR, add_dtype_arguments, extra_dtype
from common.arguments import format_size, non_negative, non_negative_float, parse_size, positive, positive_float
from align.ghm.suite import run_stage
from align.train.stage import DEFAULT_SCALE, FLIP_MODES, STAGE, TrainOptions, first_divergence, run_train


def main(argv: list[str] | None = None) -> int:
    p = stage_parser("train", __doc__, ckpt_help="mmdet checkpoint (default: the seeded synthetic one)",
                     seed_help="seed of the tiny COCO, the flips and the default weights", build_dir=BUILD_DIR)
    p.add_argument("--iters", type=positive, default=20)
    p.add_argument("--lr", type=positive_float, default=0.00125,
                   help="base learning rate of both sides (default %(default)s: 0.01 x 2/16 images)")
    p.add_argument("--warmup-iters", type=non_negative, help="linear warm-up length (default: iters // 2)")
    p.add_argument("--scale", type=parse_size, default=format_size(DEFAULT_SCALE),
                   help="train Resize bound WxH (mmdet's scale=(w, h)) for both pipelines (default %(default)s)")
    p.add_argument("--flip", choices=FLIP_MODES, default="seeded",
                   help="seeded: the same seeded decision per sample on both sides; on/off: forced")
    add_dtype_arguments(p)
    p.add_argument("--loss-rel-tol", type=non_negative_float, default=1e-4)
    args = p.parse_args(argv)

    def run():
        opts = TrainOptions(ckpt=args.ckpt, seed=args.seed, iters=args.iters, lr=args.lr,
                            warmup_iters=args.warmup_iters, scale=args.scale, flip=args.flip,
                            dtype=args.dtype, extra_dtype=extra_dtype(args),
                            loss_rel_tol=args.loss_rel_tol, reports=args.reports, build_dir=args.build_dir)
        return run_train(opts)

    def summary(result) -> str:
        worst = max(result.tensors, key=lambda t: t.rel_max if t.rel_max == t.rel_max else float("inf"))
        return f"({len(result.tensors)} compared; worst {worst.name}: rel {worst.rel_max:.2e})"

    return run_stage(run, label=lambda r: f"train ({r.meta['dtype']})", summary=summary, details=_details,
                     first_divergence=first_divergence, verbose=args.verbose, report=args.reports / (STAGE + ".html"))


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
