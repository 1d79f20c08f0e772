"""The one-line error: bad input (a missing file, a malformed value) reported as ``error: <file or
option>: <cause>`` with exit status 2, never as a traceback."""
from __future__ import annotations

__all__ = ["InputError", "one_line"]


class InputError(Exception):
    """Bad command-line input: a missing file or folder, a malformed value; the message names it."""


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (an exception without a message shows its type)."""
    text = " ".join(str(err).split())
    return text or type(err).__name__
