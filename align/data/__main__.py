"""``python -m align.data``: data-pipeline alignment; exit status 1 when it fails, 2 on bad input."""
from __future__ import annotations

import sys

from align.data.stage import DEFAULT_SCALE, DataOptions, first_divergence, run_data
from align.engine.cli import stage_parser
from align.ghm.pair import BUILD_DIR
from common.arguments import format_size, non_negative_float, parse_size, positive
from align.ghm.suite import run_stage


def main(argv: list[str] | None = None) -> int:
    p = stage_parser("data", __doc__, ckpt_help="accepted for a uniform command line; the data stage uses no weights",
                     seed_help="seed of the tiny COCO (default %(default)s)", build_dir=BUILD_DIR,
                     build_dir_help="where the tiny COCO is generated (default %(default)s)")
    p.add_argument("--scale", type=parse_size, default=format_size(DEFAULT_SCALE),
                   help="Resize bound WxH (mmdet's scale=(w, h)) for both pipelines (default %(default)s, the config's)")
    p.add_argument("--batch-size", type=positive, default=2)
    p.add_argument("--input-atol", type=non_negative_float, default=1e-6)
    p.add_argument("--inject-flip-mismatch", action="store_true",
                   help="deliberate error: Paddle flips the opposite way to mmdet (the stage must fail)")
    args = p.parse_args(argv)

    def run():
        opts = DataOptions(seed=args.seed, scale=args.scale, batch_size=args.batch_size,
                           input_atol=args.input_atol, inject_flip_mismatch=args.inject_flip_mismatch,
                           reports=args.reports, build_dir=args.build_dir)
        return run_data(opts)

    def summary(result) -> str:
        m = result.meta
        return (f"({len(result.tensors)} compared; train images kept {m['train_images_kept']}, "
                f"test images {m['test_images']}; worst input |diff| {m['worst_input_abs_diff']:.2e}; "
                f"{m['seconds']:.1f} s)")

    return run_stage(run, label=lambda r: "data", summary=summary, first_divergence=first_divergence,
                     verbose=args.verbose,
                     report=args.reports / "data.html")


if __name__ == "__main__":
    sys.exit(main())
