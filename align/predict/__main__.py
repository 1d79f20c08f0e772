"""``python -m align.predict``: prediction alignment; exit status 1 when it fails, 2 on bad input."""
from __future__ import annotations

import sys

from common.arguments import format_size, fraction, non_negative_float, parse_size
from align.engine.cli import stage_parser
from align.ghm.pair import BUILD_DIR
from align.ghm.suite import run_stage
from align.predict.stage import DEFAULT_SCALE, PredictOptions, first_divergence, run_predict


def main(argv: list[str] | None = None) -> int:
    p = stage_parser("predict", __doc__, ckpt_help="mmdet checkpoint (default: the seeded synthetic one, "
                                                   "plus its sharpened variant)", build_dir=BUILD_DIR)
    p.add_argument("--scale", type=parse_size, default=format_size(DEFAULT_SCALE),
                   help="test Resize bound WxH (mmdet's scale=(w, h)) for both pipelines (default %(default)s, the config's)")
    p.add_argument("--score-thr", type=fraction, help="override test_cfg.score_thr on both sides")
    p.add_argument("--box-atol", type=non_negative_float, default=1e-3, help="pixels (default %(default)s)")
    p.add_argument("--score-atol", type=non_negative_float, default=1e-5)
    args = p.parse_args(argv)

    def run():
        opts = PredictOptions(ckpt=args.ckpt, seed=args.seed, scale=args.scale,
                              score_thr=args.score_thr, box_atol=args.box_atol,
                              score_atol=args.score_atol, reports=args.reports, build_dir=args.build_dir)
        return run_predict(opts)

    def details(result) -> list[str]:
        return [f"{row.run:>9} image {row.image}: detections mmdet {row.detections_mmdet} paddle "
                f"{row.detections_paddle}; max |box diff| {row.max_box_diff_px:.2e} px, "
                f"max |score diff| {row.max_score_diff:.2e}; reordered pairs {row.reordered}"
                for row in result.extra_tables[0].rows]

    def summary(result) -> str:
        m = result.meta
        return (f"({len(result.tensors)} compared; worst box {m['worst_box_abs_diff_px']:.2e} px, "
                f"worst score {m['worst_score_abs_diff']:.2e}; mmdet {m['mmdet_s']:.1f} s, "
                f"paddle {m['paddle_s']:.1f} s)")

    return run_stage(run, label=lambda r: "predict", summary=summary, details=details,
                     first_divergence=first_divergence, verbose=args.verbose, report=args.reports / "predict.html")


if __name__ == "__main__":
    sys.exit(main())
