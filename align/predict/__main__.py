"""``python -m align.predict``: prediction alignment; exit status 1 when it fails, 2 on bad input."""
from __future__ import annotations

import sys

from align.engine.cli import options_parser
from align.engine.options import options_from
from align.ghm.suite import run_stage
from align.predict.stage import PredictOptions, first_divergence, run_predict


def main(argv: list[str] | None = None) -> int:
    args = options_parser("predict", __doc__, PredictOptions).parse_args(argv)
    opts = options_from(PredictOptions, args)

    def run():
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
                     first_divergence=first_divergence, verbose=args.verbose, report=opts.reports / "predict.html")


if __name__ == "__main__":
    sys.exit(main())
