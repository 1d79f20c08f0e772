"""Chunks of the first axis for the GHM losses' element-wise passes, and the threads that run them.

Chunks. At the reference scale a GHM-C call reads 24M-element tensors, and a
fresh full-size temporary costs Paddle as much as an arithmetic pass (its
memory is mapped anew and faulted in page by page). Cut along the first axis
into chunks of about `CHUNK_ELEMENTS` elements (a megabyte of float32), the
passes make their temporaries at chunk size, where the allocator reuses the
memory, and the few operations on a chunk find it in the cache.

Paddle's CPU kernels compute a tensor's elements in vectors (8 float32 on
AVX2) from its start and the last few one at a time, and the two paths
round differently now and then (an ulp of a sigmoid, an exp, a sqrt). Every
chunk but the last holds a multiple of `ALIGN_ELEMENTS` elements, so each
element takes the path it takes in the whole tensor: chunked, the
element-wise values are the whole tensor's bit for bit.

Threads. Paddle's CPU kernels for these operations (sigmoid, exp, log1p,
histogram, gather) run on one core where torch's run on every core. A pass's
chunks are independent and Paddle releases the GIL inside its kernels, so
`run` hands them to a pool of `threads()` threads: by default
``OMP_NUM_THREADS``, Paddle's own CPU thread setting (its import sets it to 1
unless the environment holds a value), or what `set_threads` chose. Only
calls of `THREADED_ELEMENTS` or more do (`threaded`): measured against one
thread at load 0.2, two threads took GHM-C's 6M-element P4 level from 83 ms
to 50-66 ms, but did not pay off below (its 1.5M-element P5: 21.6 ms, 19.6-
22.8 with two; GHM-R's 1.2M-element P3: 14.7 ms, 13.2-15.2), where the
per-operation cost of the chunks and a second thread's hand-offs weigh as
much as the arithmetic. Tensors that are not on the CPU (a GPU's kernels are
asynchronous already) run in order.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

__all__ = ["CHUNK_ELEMENTS", "THREADED_ELEMENTS", "ALIGN_ELEMENTS", "default_threads", "set_threads", "threads",
           "threaded", "spans", "run"]

# A megabyte of float32: three or four such temporaries stay in this CPU's
# caches, and Paddle's per-operation cost (microseconds) stays small beside
# the arithmetic on them.
CHUNK_ELEMENTS = 1 << 18
# Calls this large run their chunks on threads (see the module docstring).
THREADED_ELEMENTS = 1 << 22
# Chunks start at multiples of this many elements: a multiple of any CPU's
# vector width.
ALIGN_ELEMENTS = 64

_threads: Optional[int] = None
_pool: Optional[ThreadPoolExecutor] = None


def default_threads() -> int:
    """``OMP_NUM_THREADS``: Paddle sets it to 1 when it is imported, unless it
    is set already, and reads it for its own CPU threads."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def set_threads(count: Optional[int]) -> None:
    """Threads for the chunks of one pass (None: `default_threads`)."""
    global _threads, _pool
    if count is not None and count < 1:
        raise ValueError(f"threads must be a positive integer, got {count}")
    _threads = count
    if _pool is not None:
        _pool.shutdown()
        _pool = None


def threads() -> int:
    return default_threads() if _threads is None else _threads


def threaded(numel: int, on_cpu: bool) -> bool:
    """Whether a call on ``numel`` elements runs its chunks on the thread pool."""
    return on_cpu and numel >= THREADED_ELEMENTS and threads() > 1


def spans(shape, whole: bool = False) -> list:
    """Row ranges ``(start, stop)`` of the first axis covering ``shape``: chunks of
    about `CHUNK_ELEMENTS` elements, all but the last a multiple of
    `ALIGN_ELEMENTS` elements. ``[None]`` (the whole tensor as one chunk) for
    ``whole``, a 0-dim or an empty shape."""
    numel = math.prod(shape) if shape else 1
    if whole or not shape or numel == 0:
        return [None]
    rows = shape[0]
    width = numel // rows
    count = max(math.ceil(numel / CHUNK_ELEMENTS), 1)
    align = ALIGN_ELEMENTS // math.gcd(width, ALIGN_ELEMENTS)
    step = align * math.ceil(math.ceil(rows / count) / align)
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def run(fn: Callable, items: list, parallel: bool) -> list:
    """``[fn(item) for item in items]``, on the thread pool when ``parallel``
    (see `threaded`) and there is more than one item."""
    global _pool
    if not parallel or threads() < 2 or len(items) < 2:
        return [fn(item) for item in items]
    if _pool is None:
        _pool = ThreadPoolExecutor(threads(), thread_name_prefix="ghm-chunks")
    return list(_pool.map(fn, items))
