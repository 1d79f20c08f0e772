"""``python -m align.predict``: prediction alignment; exit status 1 when it fails, 2 on bad input."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from align.data.pipelines import parse_scale
from align.ghm_pair import BUILD_DIR
from align.predict.stage import DEFAULT_SCALE, PredictOptions, first_divergence, run_predict


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m align.predict", description=__doc__)
    p.add_argument("--ckpt", help="mmdet checkpoint (default: the seeded synthetic one, plus its "
                                  "sharpened variant)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", default=",".join(map(str, DEFAULT_SCALE)),
                   help="test Resize bound LONG,SHORT for both pipelines (default %(default)s, the config's)")
    p.add_argument("--score-thr", type=float, help="override test_cfg.score_thr on both sides")
    p.add_argument("--box-atol", type=float, default=1e-3, help="pixels (default %(default)s)")
    p.add_argument("--score-atol", type=float, default=1e-5)
    p.add_argument("--reports", type=Path, default=Path("reports"))
    p.add_argument("--build-dir", type=Path, default=BUILD_DIR)
    args = p.parse_args(argv)
    try:
        if args.score_thr is not None and not 0.0 <= args.score_thr < 1.0:
            raise ValueError(f"--score-thr must be in [0, 1), got {args.score_thr}")
        opts = PredictOptions(ckpt=args.ckpt, seed=args.seed, scale=parse_scale(args.scale),
                              score_thr=args.score_thr, box_atol=args.box_atol,
                              score_atol=args.score_atol, reports=args.reports, build_dir=args.build_dir)
        result = run_predict(opts)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    m = result.meta
    for row in result.extra_tables[0][2]:
        print(f"{row[0]:>9} image {row[1]}: detections mmdet {row[2]} paddle {row[3]}; "
              f"max |box diff| {row[6]:.2e} px, max |score diff| {row[7]:.2e}; reordered pairs {row[8]}")
    print(f"predict: {'PASS' if result.passed else 'FAIL'}  ({len(result.tensors)} compared; "
          f"worst box {m['worst_box_abs_diff_px']:.2e} px, worst score {m['worst_score_abs_diff']:.2e}; "
          f"mmdet {m['mmdet_s']:.1f} s, paddle {m['paddle_s']:.1f} s)")
    if not result.passed:
        print(f"first divergence: {first_divergence(result)}")
    print(f"report: {opts.reports / 'predict.html'}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
