"""``python -m align.data``: data-pipeline alignment; exit status 1 when it fails, 2 on bad input."""
from __future__ import annotations

import sys

from align.data.stage import DataOptions, first_divergence, run_data
from align.engine.cli import options_parser
from align.engine.options import options_from
from align.ghm.suite import run_stage


def main(argv: list[str] | None = None) -> int:
    args = options_parser("data", __doc__, DataOptions).parse_args(argv)
    opts = options_from(DataOptions, args)

    def run():
        return run_data(opts)

    def summary(result) -> str:
        m = result.meta
        return (f"({len(result.tensors)} compared; train images kept {m['train_images_kept']}, "
                f"test images {m['test_images']}; worst input |diff| {m['worst_input_abs_diff']:.2e}; "
                f"{m['seconds']:.1f} s)")

    return run_stage(run, label=lambda r: "data", summary=summary, first_divergence=first_divergence,
                     verbose=args.verbose,
                     report=opts.reports / "data.html")


if __name__ == "__main__":
    sys.exit(main())
