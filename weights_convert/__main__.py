"""Command line: ``python -m weights_convert {mmdet-to-paddle,torchvision-resnet50} IN OUT``."""
from __future__ import annotations

import argparse
import sys

from paddle_impl.errors import run_command
from weights_convert.convert import ConversionError, mmdet_to_paddle, torchvision_resnet50_to_paddle

COMMANDS = {
    "mmdet-to-paddle": (mmdet_to_paddle, "mmdet GHM RetinaNet checkpoint (.pth) -> Paddle .pdparams"),
    "torchvision-resnet50": (torchvision_resnet50_to_paddle,
                             "torchvision ImageNet ResNet-50 (.pth) -> Paddle backbone .pdparams"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("input", help="PyTorch checkpoint, loaded with weights_only=True")
        p.add_argument("output", help="Paddle state dict to write")
        p.add_argument("-v", "--verbose", action="store_true",
                       help="with an error, also print its Python traceback (or set GHM_TRACEBACK=1)")
    args = parser.parse_args(argv)
    convert, _ = COMMANDS[args.command]

    def run() -> int:
        print(f"wrote {convert(args.input, args.output)}")
        return 0

    return run_command(run, argv, expected=(ConversionError, KeyError))


if __name__ == "__main__":
    sys.exit(main())
