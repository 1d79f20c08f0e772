"""``python -m align.forward``: forward alignment; exit status 1 when it fails."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from align.ghm_pair import BUILD_DIR
from align.forward.stage import DEFAULT_SHAPE, ForwardOptions, first_divergence, run_forward


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m align.forward", description=__doc__)
    p.add_argument("--ckpt", help="mmdet checkpoint (default: the seeded synthetic one)")
    p.add_argument("--shape", default=DEFAULT_SHAPE, help="input NxCxHxW (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perturb", help="Paddle parameter to perturb, e.g. backbone.layer3.2.conv2.weight")
    p.add_argument("--perturb-scale", type=float, default=1e-3)
    p.add_argument("--rel-tol", type=float, default=1e-5)
    p.add_argument("--mean-tol", type=float, default=1e-5)
    p.add_argument("--reports", type=Path, default=Path("reports"))
    p.add_argument("--build-dir", type=Path, default=BUILD_DIR,
                   help="where the default checkpoint and conversions are cached")
    p.add_argument("--no-layers", action="store_true", help="skip the layer-by-layer capture")
    args = p.parse_args(argv)
    opts = ForwardOptions(ckpt=args.ckpt, shape=args.shape, seed=args.seed, perturb=args.perturb,
                          perturb_scale=args.perturb_scale, rel_tol=args.rel_tol,
                          mean_tol=args.mean_tol, reports=args.reports, layers=not args.no_layers,
                          build_dir=args.build_dir)
    try:
        result = run_forward(opts)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    worst = max(result.tensors, key=lambda t: t.rel_max)
    print(f"forward: {'PASS' if result.passed else 'FAIL'}  "
          f"({len(result.tensors)} outputs, {len(result.layers)} layer calls; "
          f"worst output {worst.name}: rel {worst.rel_max:.2e}, mean {worst.mean_abs:.2e})")
    if not result.passed:
        print(f"first divergence: {first_divergence(result)}")
    print(f"report: {opts.reports / 'forward.html'}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
