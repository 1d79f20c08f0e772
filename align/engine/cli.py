"""The command line every alignment stage shares: common arguments, exit codes, the verdict line.

A stage's ``__main__`` makes its command line from its options dataclass
(:func:`options_parser`, `align.engine.options`), builds its options, and
hands :func:`run_stage` the function that runs it and the lines that
summarise its result. Exit status: 0 PASS, 1 FAIL, 2 bad input
(one line on stderr naming the file or option; ``-v`` or the client's
traceback variable, e.g. ``<NAME>_TRACEBACK=1``, adds the traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Iterable, Optional, TypeVar

from common.arguments import non_negative
from common.errors import InputError, one_line
from common.atomic_write import write_text
from .reprod import echo_reprod_log
from .report import StageResult

T = TypeVar("T")

# Bad input or a fault of the machine (a file where a folder should be, a full disk): one line.
BAD_INPUT = (InputError, KeyError, ValueError, OSError)
# Set to show the Python traceback of such an error too (a client may name its own variable).
TRACEBACK_ENV = "ALIGN_TRACEBACK"


def options_parser(stage: str, description: str, options_class: type) -> argparse.ArgumentParser:
    """A stage's command line: ``-v`` and one option per ``option`` field of ``options_class``
    (`align.engine.options`), where each option's default and type are declared once."""
    from .options import add_options

    p = argparse.ArgumentParser(prog=f"python -m align.{stage}", description=description)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also print the per-step detail and reprod_log's per-tensor report lines "
                        "(always in <stage>_diff.log), and the traceback of a bad-input error")
    return add_options(p, options_class)


def parse_shape(text: str) -> tuple[int, ...]:
    """A tensor shape in the tensor's own order, ``"2x3x224x224"`` -> ``(2, 3, 224, 224)``;
    ``()`` when it is not positive integers joined by ``x``."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        return ()
    return shape if shape and min(shape) >= 1 else ()


def progress(items: Iterable[T], desc: str, total: Optional[int] = None) -> Iterable[T]:
    """``items`` with a tqdm bar on stderr while they are consumed; the bar is removed when
    done (the stage's summary line stays) and not drawn when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, leave=False, disable=None, dynamic_ncols=True)


def progress_bar(desc: str, total: int):
    """A tqdm bar for a stage made of ``total`` steps that are not a loop (``update(1)`` after each)."""
    from tqdm import tqdm

    return tqdm(desc=desc, total=total, leave=False, disable=None, dynamic_ncols=True)


@contextlib.contextmanager
def _captured(buffer: io.StringIO):
    """Route stdout and the root logger's records (Paddle puts a stderr handler on it) to ``buffer``."""
    root = logging.getLogger()
    handlers = root.handlers[:]
    into_buffer = logging.StreamHandler(buffer)
    into_buffer.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.handlers = [into_buffer]
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        root.handlers = handlers


def run_stage(run: Callable[[], StageResult], *, label: Callable[[StageResult], str],
              summary: Callable[[StageResult], str], first_divergence: Callable[[StageResult], object],
              report: Path, details: Callable[[StageResult], Iterable[str]] = lambda result: (),
              verbose: bool = False, traceback_env: str = TRACEBACK_ENV) -> int:
    """Run a stage and print its outcome: ``<label>: PASS|FAIL  <summary>``, the first
    divergence after a FAIL, the report's path; with ``verbose`` the details first.

    Args:
        run: builds the options and runs the stage; a ``KeyError``, ``ValueError``
            or ``OSError`` from it is bad input (exit 2, one line).
        label: the verdict line's first word(s), e.g. ``forward`` or ``backward (float64)``.
        summary: the figures after PASS/FAIL.
        first_divergence: named after a FAIL.
        report: the HTML report's path, printed last.
        details: lines printed before the verdict with ``verbose`` (the report has them all).
        verbose: also print the details and echo reprod_log's report lines (``-v``),
            and the traceback of a bad-input error before its line.
        traceback_env: the environment variable that, set to anything but 0,
            shows the traceback of a bad-input error without ``verbose``.
    """
    echo_reprod_log(verbose)
    # What libraries print or log while the stage runs (pycocotools' "loading annotations...",
    # the COCO summary table) goes to ``<report stem>_console.log``; -v shows it instead.
    printed = io.StringIO()
    try:
        with contextlib.nullcontext() if verbose else _captured(printed):
            result = run()
    except BAD_INPUT as err:
        if verbose or os.environ.get(traceback_env, "") not in ("", "0"):
            traceback.print_exc()
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except BaseException:
        sys.stdout.write(printed.getvalue())  # a crash keeps what led to it
        raise
    if printed.getvalue():
        write_text(report.with_name(f"{report.stem}_console.log"), printed.getvalue())
    if verbose:
        for line in details(result):
            print(line)
    print(f"{label(result)}: {'PASS' if result.passed else 'FAIL'}  {summary(result)}")
    if not result.passed:
        print(f"first divergence: {first_divergence(result)}")
    print(f"report: {report}")
    return 0 if result.passed else 1


def stage_command(stage: str, description: str, options_class: type, run: Callable[..., StageResult],
                  argv: Optional[list[str]] = None, **outcome) -> int:
    """``python -m align.<stage>`` for a stage whose options are ``options_class``: parse them, run
    ``run(options)`` and print its outcome through `run_stage`, with the report at
    ``<reports>/<stage>.html``.

    Args:
        outcome: `run_stage`'s keywords (``summary``, ``first_divergence``, ``details``,
            ``traceback_env``; ``label`` defaults to the stage's name).
    """
    from .options import options_from

    args = options_parser(stage, description, options_class).parse_args(argv)
    opts = options_from(options_class, args)
    outcome.setdefault("label", lambda result: stage)
    return run_stage(lambda: run(opts), verbose=args.verbose, report=opts.reports / f"{stage}.html", **outcome)
