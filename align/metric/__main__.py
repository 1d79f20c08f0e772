"""``python -m align.metric``: COCO metric alignment; exit status 1 when it fails, 2 on bad input."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from align.ghm_pair import BUILD_DIR
from align.metric.stage import MetricOptions, first_divergence, run_metric


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m align.metric", description=__doc__)
    p.add_argument("--ckpt", help="accepted for a uniform command line; the metric stage scores "
                                  "seeded synthetic detections and uses no weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny COCO and the detections")
    p.add_argument("--drop-detection", action="store_true",
                   help="deliberate error: Paddle's side loses one true detection (the stage must fail)")
    p.add_argument("--reports", type=Path, default=Path("reports"))
    p.add_argument("--build-dir", type=Path, default=BUILD_DIR)
    args = p.parse_args(argv)
    try:
        opts = MetricOptions(seed=args.seed, drop_detection=args.drop_detection, reports=args.reports,
                             build_dir=args.build_dir)
        result = run_metric(opts)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, raw_mm, raw_pd, rep_mm, rep_pd in result.extra_tables[0][2]:
        print(f"{name:>16}: mmdet {raw_mm:.12f} paddle {raw_pd:.12f}  reported {rep_mm:.3f} / {rep_pd:.3f}")
    worst = max(result.tensors, key=lambda t: t.max_abs if t.max_abs == t.max_abs else float("inf"))
    print(f"metric: {'PASS' if result.passed else 'FAIL'}  ({len(result.tensors)} compared; "
          f"{result.meta['detections']} detections; worst {worst.name}: |diff| {worst.max_abs:.2e})")
    if not result.passed:
        print(f"first divergence: {first_divergence(result)}")
    print(f"report: {opts.reports / 'metric.html'}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
