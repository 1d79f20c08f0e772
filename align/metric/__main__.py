"""``python -m align.metric``: COCO metric alignment; exit status 1 when it fails, 2 on bad input."""
from __future__ import annotations

import sys

from align.engine.cli import stage_command
from align.ghm.suite import TRACEBACK_ENV
from align.metric.stage import MetricOptions, first_divergence, run_metric


def _details(result) -> list[str]:
    return [f"{r.metric:>16}: mmdet {r.mmdet_raw:.12f} paddle {r.paddle_raw:.12f}  "
            f"reported {r.mmdet_reported:.3f} / {r.paddle_reported:.3f}" for r in result.extra_tables[0].rows]


def _summary(result) -> str:
    worst = max(result.tensors, key=lambda t: t.max_abs if t.max_abs == t.max_abs else float("inf"))
    return (f"({len(result.tensors)} compared; {result.meta['detections']} detections; "
            f"worst {worst.name}: |diff| {worst.max_abs:.2e})")


def main(argv: list[str] | None = None) -> int:
    return stage_command("metric", __doc__, MetricOptions, run_metric, argv, summary=_summary, details=_details,
                         first_divergence=first_divergence, traceback_env=TRACEBACK_ENV)


if __name__ == "__main__":
    sys.exit(main())
