"""``python -m align.predict``: prediction alignment; exit status 1 when it fails, 2 on bad input."""
from __future__ import annotations

import sys

from align.engine.cli import stage_command
from align.ghm.suite import TRACEBACK_ENV
from align.predict.stage import PredictOptions, first_divergence, run_predict


def _details(result) -> list[str]:
    return [f"{row.run:>9} image {row.image}: detections mmdet {row.detections_mmdet} paddle "
            f"{row.detections_paddle}; max |box diff| {row.max_box_diff_px:.2e} px, "
            f"max |score diff| {row.max_score_diff:.2e}; reordered pairs {row.reordered}"
            for row in result.extra_tables[0].rows]


def _summary(result) -> str:
    m = result.meta
    return (f"({len(result.tensors)} compared; worst box {m['worst_box_abs_diff_px']:.2e} px, "
            f"worst score {m['worst_score_abs_diff']:.2e}; mmdet {m['mmdet_s']:.1f} s, "
            f"paddle {m['paddle_s']:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    return stage_command("predict", __doc__, PredictOptions, run_predict, argv, summary=_summary, details=_details,
                         first_divergence=first_divergence, traceback_env=TRACEBACK_ENV)


if __name__ == "__main__":
    sys.exit(main())
