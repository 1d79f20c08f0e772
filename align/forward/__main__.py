"""``python -m align.forward``: forward alignment; exit status 1 when it fails."""
from __future__ import annotations

import sys

from align.engine.cli import options_parser
from align.engine.options import options_from
from align.forward.stage import ForwardOptions, first_divergence, run_forward
from align.ghm.suite import run_stage


def main(argv: list[str] | None = None) -> int:
    args = options_parser("forward", __doc__, ForwardOptions).parse_args(argv)
    opts = options_from(ForwardOptions, args)

    def summary(result) -> str:
        worst = max(result.tensors, key=lambda t: t.rel_max)
        return (f"({len(result.tensors)} outputs, {len(result.layers)} layer calls; "
                f"worst output {worst.name}: rel {worst.rel_max:.2e}, mean {worst.mean_abs:.2e})")

    return run_stage(lambda: run_forward(opts), label=lambda r: "forward", summary=summary,
                     first_divergence=first_divergence, verbose=args.verbose, report=opts.reports / "forward.html")


if __name__ == "__main__":
    sys.exit(main())
