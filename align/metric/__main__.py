"""``python -m align.metric``: COCO metric alignment; exit status 1 when it fails, 2 on bad input."""
from __future__ import annotations

import sys

from align.engine.cli import options_parser
from align.engine.options import options_from
from align.ghm.suite import run_stage
from align.metric.stage import MetricOptions, first_divergence, run_metric


def main(argv: list[str] | None = None) -> int:
    args = options_parser("metric", __doc__, MetricOptions).parse_args(argv)
    opts = options_from(MetricOptions, args)

    def run():
        return run_metric(opts)

    def details(result) -> list[str]:
        return [f"{r.metric:>16}: mmdet {r.mmdet_raw:.12f} paddle {r.paddle_raw:.12f}  "
                f"reported {r.mmdet_reported:.3f} / {r.paddle_reported:.3f}" for r in result.extra_tables[0].rows]

    def summary(result) -> str:
        worst = max(result.tensors, key=lambda t: t.max_abs if t.max_abs == t.max_abs else float("inf"))
        return (f"({len(result.tensors)} compared; {result.meta['detections']} detections; "
                f"worst {worst.name}: |diff| {worst.max_abs:.2e})")

    return run_stage(run, label=lambda r: "metric", summary=summary, details=details,
                     first_divergence=first_divergence, verbose=args.verbose, report=opts.reports / "metric.html")


if __name__ == "__main__":
    sys.exit(main())
