"""``python -m align.backward``: training-step alignment; exit status 1 when it fails."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from align.backward.stage import DEFAULT_SHAPE, BackwardOptions, first_divergence, run_backward
from align.ghm_pair import BUILD_DIR


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m align.backward", description=__doc__)
    p.add_argument("--ckpt", help="mmdet checkpoint (default: the seeded synthetic one)")
    p.add_argument("--shape", default=DEFAULT_SHAPE, help="batch NxCxHxW (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.02, help="base learning rate (default %(default)s)")
    p.add_argument("--warmup-iters", type=int, help="linear warm-up length (default: steps // 2)")
    p.add_argument("--reports", type=Path, default=Path("reports"))
    p.add_argument("--build-dir", type=Path, default=BUILD_DIR)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    opts = BackwardOptions(ckpt=args.ckpt, shape=args.shape, seed=args.seed, steps=args.steps,
                           lr=args.lr, warmup_iters=args.warmup_iters, reports=args.reports,
                           build_dir=args.build_dir)
    try:
        result = run_backward(opts)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = result.extra_tables[0][2]
    for row in table:
        print(f"step {row[0]:>3}: loss mmdet {row[1]:.6f} paddle {row[2]:.6f} rel {row[3]:.1e} "
              f"lr {row[4]:.3e} grad norm {row[5]:.4f} / {row[6]:.4f}")
    worst = max(result.tensors, key=lambda t: t.rel_max)
    print(f"backward: {'PASS' if result.passed else 'FAIL'}  ({len(result.tensors)} compared; "
          f"worst {worst.name}: rel {worst.rel_max:.2e}); mmdet {result.meta['mmdet_s']:.1f} s, "
          f"paddle {result.meta['paddle_s']:.1f} s")
    if not result.passed:
        print(f"first divergence: {first_divergence(result)}")
    print(f"report: {opts.reports / 'backward.html'}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
