"""``python -m align.data``: data-pipeline alignment; exit status 1 when it fails, 2 on bad input."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from align.data.pipelines import parse_scale
from align.data.stage import DEFAULT_SCALE, DataOptions, first_divergence, run_data
from align.ghm_pair import BUILD_DIR


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m align.data", description=__doc__)
    p.add_argument("--ckpt", help="accepted for a uniform command line; the data stage uses no weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny COCO (default %(default)s)")
    p.add_argument("--scale", default=",".join(map(str, DEFAULT_SCALE)),
                   help="Resize bound LONG,SHORT for both pipelines (default %(default)s, the config's)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--input-atol", type=float, default=1e-6)
    p.add_argument("--inject-flip-mismatch", action="store_true",
                   help="deliberate error: Paddle flips the opposite way to mmdet (the stage must fail)")
    p.add_argument("--reports", type=Path, default=Path("reports"))
    p.add_argument("--build-dir", type=Path, default=BUILD_DIR,
                   help="where the tiny COCO is generated (default %(default)s)")
    args = p.parse_args(argv)
    try:
        opts = DataOptions(seed=args.seed, scale=parse_scale(args.scale), batch_size=args.batch_size,
                           input_atol=args.input_atol, inject_flip_mismatch=args.inject_flip_mismatch,
                           reports=args.reports, build_dir=args.build_dir)
        result = run_data(opts)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    m = result.meta
    print(f"data: {'PASS' if result.passed else 'FAIL'}  ({len(result.tensors)} compared; "
          f"train images kept {m['train_images_kept']}, test images {m['test_images']}; "
          f"worst input |diff| {m['worst_input_abs_diff']:.2e}; {m['seconds']:.1f} s)")
    if not result.passed:
        print(f"first divergence: {first_divergence(result)}")
    print(f"report: {opts.reports / 'data.html'}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
