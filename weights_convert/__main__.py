"""Command line: ``python -m weights_convert {mmdet-to-paddle,torchvision-resnet50} IN OUT``."""
from __future__ import annotations

import argparse
import sys

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
    args = parser.parse_args(argv)
    convert, _ = COMMANDS[args.command]
    try:
        out = convert(args.input, args.output)
    except (ConversionError, FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
