"""A fault-injection switch for the tests of multi-process training: one rank fails on purpose.

``GHM_INJECT_FAULT=RANK:ITER:HOW`` in the environment of a training process
makes the process of global rank ``RANK`` fail as iteration ``ITER`` (1-based)
begins, after iteration ``ITER - 1`` is complete: ``HOW`` is ``kill`` (the
process sends itself SIGKILL, as the kernel's out-of-memory killer would: no
handler runs, nothing is flushed) or ``raise`` (a ``RuntimeError`` escapes the
training loop, as a defect would). Unset, it costs one dictionary lookup per
iteration. The tests of the launcher (``tests/paddle_impl/test_launch_nodes.py``)
use it; it is not a training option.
"""
from __future__ import annotations

import os
import signal

FAULT_ENV = "GHM_INJECT_FAULT"
HOWS = ("kill", "raise")


def parse_fault(text: str) -> tuple[int, int, str]:
    """``"RANK:ITER:HOW"`` -> ``(rank, iteration, how)``; ``ValueError`` naming the variable."""
    try:
        rank, iteration, how = text.split(":")
        rank_i, iter_i = int(rank), int(iteration)
    except ValueError:
        raise ValueError(f"{FAULT_ENV}={text!r}: expected RANK:ITER:HOW, e.g. 1:3:kill") from None
    if rank_i < 0 or iter_i < 1 or how not in HOWS:
        raise ValueError(f"{FAULT_ENV}={text!r}: RANK >= 0, ITER >= 1, HOW one of {', '.join(HOWS)}")
    return rank_i, iter_i, how


def maybe_fail(rank: int, iteration: int) -> None:
    """Fail here when ``GHM_INJECT_FAULT`` names this rank and ``iteration`` (the one beginning)."""
    text = os.environ.get(FAULT_ENV)
    if not text:
        return
    fault_rank, fault_iter, how = parse_fault(text)
    if (fault_rank, fault_iter) != (rank, iteration):
        return
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"{FAULT_ENV}: rank {rank} fails at iteration {iteration} on purpose")
