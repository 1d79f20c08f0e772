"""Argument types shared by the command-line programs.

Sizes: every command takes an image size as ``WxH``, width first, as mmdet's
``Resize(scale=(w, h))`` (``1333x800``); ``W,H`` is read the same way. All
are parsed by :func:`parse_size`, which returns ``(w, h)``. A tensor shape
(the stages' ``SHAPE``) is written in the tensor's own order, ``NxCxHxW``.
"""
from __future__ import annotations

import argparse
import math

from align.engine.arguments import non_negative, positive  # noqa: F401 (the programs take them from here too)
from paddle_impl.errors import InputError


class SizeError(argparse.ArgumentTypeError, ValueError):
    """A size that is not ``WxH`` with both sides large enough (argparse and the stages both report it)."""


def parse_size(text: str, minimum: int = 32) -> tuple[int, int]:
    """``"WxH"`` (or ``"W,H"``) -> ``(w, h)``, mmdet's ``Resize(scale=(w, h))`` order."""
    try:
        w, h = (int(v) for v in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise SizeError(f"a size is WxH, width first, such as 1333x800; got {text!r}") from None
    if w < minimum or h < minimum:
        raise SizeError(f"size {text!r} too small: both sides must be >= {minimum}")
    return w, h


def format_size(size) -> str:
    """``(w, h)`` -> ``"WxH"``, the form `parse_size` reads (for defaults shown in ``--help``)."""
    w, h = size
    return f"{w}x{h}"


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
