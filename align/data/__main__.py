"""``python -m align.data``: data-pipeline alignment; exit status 1 when it fails, 2 on bad input."""
from __future__ import annotations

import sys

from align.data.stage import DataOptions, first_divergence, run_data
from align.engine.cli import stage_command
from align.ghm.suite import TRACEBACK_ENV


def _summary(result) -> str:
    m = result.meta
    return (f"({len(result.tensors)} compared; train images kept {m['train_images_kept']}, "
            f"test images {m['test_images']}; worst input |diff| {m['worst_input_abs_diff']:.2e}; "
            f"{m['seconds']:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    return stage_command("data", __doc__, DataOptions, run_data, argv, summary=_summary,
                         first_divergence=first_divergence, traceback_env=TRACEBACK_ENV)


if __name__ == "__main__":
    sys.exit(main())
