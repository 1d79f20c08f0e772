"""``python -m align.deploy``: deployment alignment; exit status 1 when it fails, 2 on bad input."""
from __future__ import annotations

import sys

from align.deploy.stage import DeployOptions, first_divergence, run_deploy
from align.engine.cli import stage_command
from align.ghm.suite import TRACEBACK_ENV


def _details(result) -> list[str]:
    return [f"{row.run:>28} image {row.image}: detections mmdet {row.detections_mmdet} path "
            f"{row.detections_paddle}; max |box diff| {row.max_box_diff_px:.2e} px, "
            f"max |score diff| {row.max_score_diff:.2e}" for row in result.extra_tables[0].rows]


def _summary(result) -> str:
    m = result.meta
    times = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    return f"({len(result.tensors)} compared; worst raw output {m['worst_raw_rel']:.2e} relative; {times})"


def main(argv: list[str] | None = None) -> int:
    return stage_command("deploy", __doc__, DeployOptions, run_deploy, argv, summary=_summary, details=_details,
                         first_divergence=first_divergence, traceback_env=TRACEBACK_ENV)


if __name__ == "__main__":
    sys.exit(main())
