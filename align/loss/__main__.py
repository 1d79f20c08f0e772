"""``python -m align.loss``: loss alignment; exit status 1 when it fails."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from align.ghm_pair import BUILD_DIR
from align.loss.stage import DEFAULT_SHAPE, LossOptions, first_divergence, run_loss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m align.loss", description=__doc__)
    p.add_argument("--ckpt", help="mmdet checkpoint (default: the seeded synthetic one)")
    p.add_argument("--shape", default=DEFAULT_SHAPE, help="batch 2x3xHxW (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=4, help="loss calls in a row (5 GHM calls each)")
    p.add_argument("--rel-tol", type=float, default=1e-6)
    p.add_argument("--mean-tol", type=float, default=1e-6)
    p.add_argument("--loss-rel-tol", type=float, default=5e-6,
                   help="relative bound on loss terms (mmdet's float32 sums are off ~1e-6)")
    p.add_argument("--reports", type=Path, default=Path("reports"))
    p.add_argument("--build-dir", type=Path, default=BUILD_DIR)
    args = p.parse_args(argv)
    opts = LossOptions(ckpt=args.ckpt, shape=args.shape, seed=args.seed, iters=args.iters,
                       rel_tol=args.rel_tol, mean_tol=args.mean_tol, loss_rel_tol=args.loss_rel_tol,
                       reports=args.reports,
                       build_dir=args.build_dir)
    try:
        result = run_loss(opts)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    worst = max(result.tensors, key=lambda t: t.rel_max)
    m = result.meta
    print(f"loss: {'PASS' if result.passed else 'FAIL'}  ({len(result.tensors)} compared; "
          f"worst {worst.name}: rel {worst.rel_max:.2e})")
    print(f"time in the loss over {opts.iters} iterations: mmdet {m['mmdet_loss_s']:.2f} s, "
          f"paddle {m['paddle_loss_s']:.2f} s")
    if not result.passed:
        print(f"first divergence: {first_divergence(result)}")
    print(f"report: {opts.reports / 'loss.html'}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
