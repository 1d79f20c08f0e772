"""One training process of a launched job, and a record of how it ended.

    python -m paddle_impl.launch.rank_exit PROGRAM [ARGS...]

Paddle's launcher starts this in place of the training program, once per
rank. It starts ``PROGRAM`` as its child and writes ``rank.<R>.json`` into
the launcher's log folder (``PADDLE_LOG_DIR``; ``R`` is the global rank): once
when the rank starts and again when it ends, with the exit status or the
signal that ended it and whether the launcher had asked it to stop.

Why a parent process. The launcher itself logs only the first failed
process it notices, and when one rank dies the others fail a moment later
on the broken connection or are stopped by the launcher; their exit codes
are lost. A rank killed with SIGKILL (by the kernel's out-of-memory killer,
for one) cannot record anything itself. This parent survives its child and
records every rank's end, so the launcher wrapper
(:mod:`paddle_impl.launch.job`) can name the rank that failed first.

Exit status: the child's, or 128 + the signal number when a signal ended it.
The child dies with this process (Linux ``PR_SET_PDEATHSIG``), so a launcher
that kills this process does not leave the training running.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from common.atomic_write import write_json

LAUNCH_ID_ENV = "GHM_LAUNCH_ID"
# The launcher waits 3 s after its SIGTERM before it kills this process; the
# child must be gone by then.
_CHILD_GRACE_S = 2
_PR_SET_PDEATHSIG = 1


def record_path(folder: str | os.PathLike, rank: int) -> Path:
    return Path(folder) / f"rank.{rank}.json"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the launcher's own clean-up is all there is


def main(argv: Sequence[str] | None = None) -> int:
    program = list(sys.argv[1:] if argv is None else argv)
    if not program:
        print("usage: python -m paddle_impl.launch.rank_exit PROGRAM [ARGS...]", file=sys.stderr)
        return 2
    env = os.environ
    rank, local_rank = int(env["PADDLE_TRAINER_ID"]), int(env.get("PADDLE_LOCAL_RANK", "0"))
    path = record_path(env["PADDLE_LOG_DIR"], rank)
    record = {"launch_id": env.get(LAUNCH_ID_ENV), "rank": rank, "local_rank": local_rank,
              "log": f"workerlog.{local_rank}", "pid": os.getpid(), "started": time.time()}
    write_json(path, record)

    stop_signals: list[int] = []
    child = subprocess.Popen(program, preexec_fn=_die_with_parent)

    def on_stop(signum, _frame) -> None:
        # The launcher signals the whole process group, so the child has it too.
        stop_signals.append(signum)
        signal.alarm(_CHILD_GRACE_S)

    def on_alarm(_signum, _frame) -> None:
        child.kill()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_stop)
    signal.signal(signal.SIGALRM, on_alarm)
    code = child.wait()
    signal.alarm(0)
    record.update(ended=time.time(), exit_code=code,
                  signal=_signal_name(-code) if code < 0 else None,
                  stopped_by_launcher=_signal_name(stop_signals[0]) if stop_signals else None)
    write_json(path, record)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
