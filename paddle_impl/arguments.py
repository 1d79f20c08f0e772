"""Argument types of the training and prediction programs: the learning rate, the milestones,
the evaluation backend (the generic ones, sizes included, are in `common.arguments`)."""
from __future__ import annotations

import argparse
import math

from common.errors import InputError


def learning_rate(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lr must be 'auto' or a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"--lr must be positive, got {text!r}")
    return value


def epochs_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected epochs such as 8,11, got {text!r}") from None
    if values != sorted(values) or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"milestones must be increasing positive epochs, got {text!r}")
    return values


def add_eval_backend(parser: argparse.ArgumentParser) -> None:
    """``--eval-backend``: the library that computes the COCO box metrics (checked by :func:`eval_backend`,
    so that a wrong name is reported in one line like any other bad input)."""
    from paddle_impl.evaluation.coco_eval import EVAL_BACKENDS

    parser.add_argument("--eval-backend", default=EVAL_BACKENDS[0], metavar="{" + ",".join(EVAL_BACKENDS) + "}",
                        help=f"library computing the COCO box metrics, identical numbers "
                             f"(default {EVAL_BACKENDS[0]}, what mmdet uses)")


def eval_backend(args: argparse.Namespace) -> str:
    """``args.eval_backend`` when it names an installed backend, else an :class:`InputError` naming the option."""
    from paddle_impl.evaluation.coco_eval import check_backend

    try:
        return check_backend(args.eval_backend)
    except ValueError as err:
        raise InputError(f"--eval-backend: {err}") from None
