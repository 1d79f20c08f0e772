"""``python -m align.pair``: align a torch module and a Paddle layer that your own functions build;
a shortcut onto the forward stage (`python -m align.forward --torch ... --paddle ...`).

    python -m align.pair --torch pkg.module:build_torch --paddle pkg.module:build_paddle \\
        [--map names.json] [--isolate] [--backward] [--dtype float64] [--cache] \\
        [--shape 2x3x224x224 | --input ids:int64:2x16:0..1000 --input mask:bool:2x16 | --inputs in.npz]

Each builder is called without arguments and returns the model (in the mode
to compare: ``eval()`` for inference). Weights go from the torch model to the
Paddle one as the map file says (``--map``: prefixes, tensor rules, class
converters, see `align.engine.weights`; what is compared, `align.engine.selection`).
Exit status: 0 PASS, 1 FAIL, 2 bad input (one line naming it).
"""
from __future__ import annotations

import sys

from align.forward.__main__ import main as forward_main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not any(a in ("-h", "--help") for a in argv):
        for flag in ("--torch", "--paddle"):
            if not any(a == flag or a.startswith(flag + "=") for a in argv):
                print(f"python -m align.pair: error: {flag} is required (module:function building that side's model)",
                      file=sys.stderr)
                return 2
    return forward_main(argv, program="pair")


if __name__ == "__main__":
    sys.exit(main())
