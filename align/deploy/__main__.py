"""``python -m align.deploy``: deployment alignment; exit status 1 when it fails, 2 on bad input."""
from __future__ import annotations

import sys

from align.deploy.stage import DeployOptions, first_divergence, run_deploy
from align.engine.cli import options_parser
from align.engine.options import options_from
from align.ghm.suite import run_stage


def main(argv: list[str] | None = None) -> int:
    args = options_parser("deploy", __doc__, DeployOptions).parse_args(argv)
    opts = options_from(DeployOptions, args)

    def run():
        return run_deploy(opts)

    def details(result) -> list[str]:
        return [f"{row.run:>28} image {row.image}: detections mmdet {row.detections_mmdet} path "
                f"{row.detections_paddle}; max |box diff| {row.max_box_diff_px:.2e} px, "
                f"max |score diff| {row.max_score_diff:.2e}" for row in result.extra_tables[0].rows]

    def summary(result) -> str:
        m = result.meta
        times = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
        return f"({len(result.tensors)} compared; worst raw output {m['worst_raw_rel']:.2e} relative; {times})"

    return run_stage(run, label=lambda r: "deploy", summary=summary, details=details,
                     first_divergence=first_divergence, verbose=args.verbose, report=opts.reports / "deploy.html")


if __name__ == "__main__":
    sys.exit(main())
