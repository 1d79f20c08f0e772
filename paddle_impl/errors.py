"""The faults a command reports in one line, and the wrapper that reports them.

A fault of the input or of the machine (a missing or unsafe file, an image
that does not decode, a full disk, a loss that is no longer finite) ends a
command with exit status 2 and one line on stderr: ``error: <file or
option>: <cause>``. The Python traceback is shown only with ``-v`` on the
command line or ``GHM_TRACEBACK=1`` in the environment.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Sequence

from common.errors import InputError, one_line

TRACEBACK_ENV = "GHM_TRACEBACK"
EXIT_BAD_INPUT = 2


class DataError(Exception):
    """An image or annotation that cannot be used; the message names the file and the image id."""


class NonFiniteLossError(FloatingPointError):
    """A training loss (or the gradient norm) became NaN or infinite; the message names the
    iteration and the term. Nothing from that iteration was saved."""


def traceback_wanted(argv: Sequence[str] | None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return "-v" in args or "--verbose" in args or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def run_command(main: Callable[[], int], argv: Sequence[str] | None,
                expected: tuple[type[BaseException], ...] = ()) -> int:
    """Call ``main()`` and turn the faults it may meet into one line and exit status 2.

    ``expected`` adds exception types of the caller's own to the ones handled
    here (input, data, write and non-finite errors, ``ValueError``,
    ``OSError``). Anything else is a defect and propagates with its traceback.
    """
    handled = (InputError, DataError, NonFiniteLossError, ValueError, OSError) + tuple(expected)
    try:
        return main()
    except handled as err:
        if traceback_wanted(argv):
            traceback.print_exc()
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
