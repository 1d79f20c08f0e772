"""Argument types of the command lines: each checks a value as argparse reads it, so a bad value
is refused before the program does any work, in argparse's one line that names the option and
the value (``argument --seed: expected an integer >= 0, got '-1'``).

Sizes: every command takes an image size as ``WxH``, width first, as mmdet's
``Resize(scale=(w, h))`` (``1333x800``); ``W,H`` is read the same way. All
are parsed by :func:`parse_size`, which returns ``(w, h)``. A tensor shape
(the stages' ``SHAPE``) is written in the tensor's own order, ``NxCxHxW``.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable


def positive(text: str) -> int:
    """An integer >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative(text: str) -> int:
    """An integer >= 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate, a clipping bound, a perturbation's scale)."""
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (a tolerance: 0 asks for equality)."""
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1) (a score threshold)."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def tensor_shape(dims: int | None = None, channels: int | None = None) -> Callable[[str], str]:
    """A type for a tensor shape in the tensor's own order (``2x3x224x224``): positive
    integers joined by ``x``; ``dims`` of them and ``channels`` second when given. The value
    stays the text as written (the stages record it so); `align.engine.cli.parse_shape` reads it."""
    def parse(text: str) -> str:
        try:
            shape = tuple(int(v) for v in text.lower().split("x"))
        except ValueError:
            shape = ()
        wanted = "x".join(["N", "C", "H", "W"][:dims] if dims == 4 else ["D"] * (dims or 2))
        if not shape or min(shape) < 1 or (dims is not None and len(shape) != dims) or \
                (dims is None and len(shape) < 2):
            raise argparse.ArgumentTypeError(f"expected {wanted}, positive integers joined by x, got {text!r}")
        if channels is not None and shape[1] != channels:
            raise argparse.ArgumentTypeError(f"expected {channels} channels (the second extent), got {text!r}")
        return text
    parse.__name__ = "shape"
    return parse


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


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value
