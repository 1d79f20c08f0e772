"""What a benchmark records about the run it measured (library versions, cores, threads, load), and how it times.

The cores of these machines are shared, so every benchmark writes the load
average before and after its measurements next to its figures, and the
sides it compares take turns call by call (`alternating_medians_ms`).
"""
from __future__ import annotations

import os
import platform
import statistics
import time


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the platform has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def cpu_info() -> dict:
    """The processor a measurement ran on: its cores, those this process may use, its model."""
    return dict(
        cpu_count=os.cpu_count(),
        cpus_available=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        cpu_model=platform.processor() or platform.machine(),
    )


def machine_info() -> dict:
    """Versions of the compared libraries, the CPU and the threads each library uses.

    Imports torch and Paddle: call it after any settings that must precede
    their import (``paddle_impl.engine.runtime.configure_cpu``).
    """
    import mmcv
    import mmdet
    import mmengine
    import numpy as np
    import paddle
    import torch

    return dict(
        python=platform.python_version(),
        numpy=np.__version__,
        torch=torch.__version__,
        paddle=paddle.__version__,
        mmcv=mmcv.__version__,
        mmengine=mmengine.__version__,
        mmdet=mmdet.__version__,
        **cpu_info(),
        torch_num_threads=torch.get_num_threads(),
        torch_num_interop_threads=torch.get_num_interop_threads(),
        thread_env={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CPU_NUM")},
        paddle_device=paddle.get_device(),
    )


def set_threads(requested: int | None) -> int:
    """Give torch and Paddle the same math thread count and return it: ``requested``, or
    torch's default (the cores available) when None; 0 leaves each library its own default."""
    import paddle
    import torch

    threads = torch.get_num_threads() if requested is None else requested
    if threads > 0:
        torch.set_num_threads(threads)
        paddle.base.core.set_num_threads(threads)
    return threads


def alternating_medians_ms(runs, repeats: int) -> list[float]:
    """Median wall time of each of ``runs`` over ``repeats`` calls, the runs
    taking turns call by call after one warm-up call each."""
    for run in runs:
        run()
    times = [[] for _ in runs]
    for _ in range(repeats):
        for run, spent in zip(runs, times):
            start = time.perf_counter()
            run()
            spent.append(time.perf_counter() - start)
    return [1e3 * statistics.median(spent) for spent in times]
