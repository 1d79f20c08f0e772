"""``python -m align.train``: K training iterations on the tiny COCO; exit status 1 when it fails, 2 on bad input."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from align.data.pipelines import parse_scale
from align.ghm_pair import BUILD_DIR
from align.train.stage import DEFAULT_SCALE, FLIP_MODES, TrainOptions, first_divergence, run_train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m align.train", description=__doc__)
    p.add_argument("--ckpt", help="mmdet checkpoint (default: the seeded synthetic one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny COCO, the flips and the default weights")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.00125,
                   help="base learning rate of both sides (default %(default)s: 0.01 x 2/16 images)")
    p.add_argument("--warmup-iters", type=int, help="linear warm-up length (default: iters // 2)")
    p.add_argument("--scale", default=",".join(map(str, DEFAULT_SCALE)),
                   help="train Resize bound LONG,SHORT for both pipelines (default %(default)s)")
    p.add_argument("--flip", choices=FLIP_MODES, default="seeded",
                   help="seeded: the same seeded decision per sample on both sides; on/off: forced")
    p.add_argument("--loss-rel-tol", type=float, default=1e-4)
    p.add_argument("--reports", type=Path, default=Path("reports"))
    p.add_argument("--build-dir", type=Path, default=BUILD_DIR)
    args = p.parse_args(argv)
    try:
        opts = TrainOptions(ckpt=args.ckpt, seed=args.seed, iters=args.iters, lr=args.lr,
                            warmup_iters=args.warmup_iters, scale=parse_scale(args.scale), flip=args.flip,
                            loss_rel_tol=args.loss_rel_tol, reports=args.reports, build_dir=args.build_dir)
        result = run_train(opts)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for row in result.extra_tables[0][2]:
        print(f"iter {row[0]:>3} (epoch {row[1]}, images {row[2]}, flips {row[3]}): lr {row[4]:.3e} "
              f"loss mmdet {row[5]:.6f} paddle {row[6]:.6f} rel {row[7]:.1e}")
    m = result.meta
    worst = max(result.tensors, key=lambda t: t.rel_max if t.rel_max == t.rel_max else float("inf"))
    print(f"train: {'PASS' if result.passed else 'FAIL'}  ({len(result.tensors)} compared; worst {worst.name}: "
          f"rel {worst.rel_max:.2e}); mmdet {m['mmdet_s']:.1f} s, paddle {m['paddle_s']:.1f} s")
    if not result.passed:
        print(f"first divergence: {first_divergence(result)}")
    if m["first_ghm_bin_count_difference"]:
        print(f"first GHM call whose bin counts differ: {m['first_ghm_bin_count_difference']}")
    print(f"report: {opts.reports / 'train.html'}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
