"""Both sides logged with reprod_log and diffed the way Paddle's reproduction guide does.

reprod_log's ``ReprodLogger`` and ``ReprodDiffHelper`` are used as they are;
around them this module saves atomically, keeps out the keys reprod_log would
assert on (or silently broadcast), and undoes the logging handlers its report
leaves behind. The verdict stays `align.engine.compare.diff_arrays`'s:
reprod_log's own mean check lets a NaN through.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os

import numpy as np

from common.atomic_write import atomic_write

# An empty array on both sides: nothing to diff, so its mean difference is 0.
_EMPTY = "empty on both sides, nothing to compare"


def reprod_log_passed(means: dict[str, float], diff_threshold: float) -> bool:
    """reprod_log's "mean" acceptance, with non-finite means failing (NaN > thr is False there)."""
    return all(math.isfinite(v) and v <= diff_threshold for v in means.values())


def _save_reprod_log(arrays: dict[str, np.ndarray], path: str) -> None:
    """Save ``arrays`` with ReprodLogger at ``path`` (a full .npy name), atomically."""
    from reprod_log import ReprodLogger

    logger = ReprodLogger()
    for key, value in arrays.items():
        logger.add(key, np.asarray(value))
    # np.save appends ".npy" to a name without it: the temporary name keeps the suffix.
    atomic_write(path, logger.save, keep_suffix=True)


def reprod_log_diff(
    paddle: dict[str, np.ndarray],
    torch: dict[str, np.ndarray],
    out_dir: str | os.PathLike,
    stage: str,
    diff_threshold: float,
) -> dict[str, float]:
    """Log both sides with reprod_log and diff them the way Paddle's reproduction guide does.

    Writes ``{out_dir}/{stage}_paddle.npy``, ``{out_dir}/{stage}_torch.npy``
    (ReprodLogger) and ``{out_dir}/{stage}_diff.log`` (ReprodDiffHelper's
    report, diff_method "mean"), each under a temporary name first.

    Keys present on one side only, or whose shapes differ, are saved but not
    diffed (reprod_log would assert, or silently transpose/broadcast): they
    get NaN in the result and a line at the end of the log. Empty arrays of
    equal shape get 0.

    Returns:
        key -> mean absolute difference as computed by reprod_log. Judge it
        with `reprod_log_passed`, not with reprod_log's printed verdict.
    """
    from reprod_log import ReprodDiffHelper

    os.makedirs(out_dir, exist_ok=True)
    paddle_path = os.path.join(out_dir, f"{stage}_paddle.npy")
    torch_path = os.path.join(out_dir, f"{stage}_torch.npy")
    log_path = os.path.join(out_dir, f"{stage}_diff.log")
    _save_reprod_log(paddle, paddle_path)
    _save_reprod_log(torch, torch_path)

    helper = ReprodDiffHelper()
    paddle_info = helper.load_info(paddle_path)
    torch_info = helper.load_info(torch_path)

    comparable: list[str] = []
    skipped: dict[str, str] = {}
    for key in list(paddle_info) + [k for k in torch_info if k not in paddle_info]:
        if key not in torch_info:
            skipped[key] = "missing in torch"
        elif key not in paddle_info:
            skipped[key] = "missing in paddle"
        elif np.shape(paddle_info[key]) != np.shape(torch_info[key]):
            skipped[key] = (
                f"shape mismatch paddle {np.shape(paddle_info[key])} "
                f"vs torch {np.shape(torch_info[key])}, not compared"
            )
        elif np.size(paddle_info[key]) == 0:
            # reprod_log takes the max of the difference, which raises on empty arrays.
            skipped[key] = _EMPTY
        else:
            comparable.append(key)
    # float64 copies: reprod_log subtracts raw arrays, which raises on bool
    # and wraps around on unsigned integers.
    paddle_cmp = {k: np.asarray(paddle_info[k], dtype=np.float64) for k in comparable}
    torch_cmp = {k: np.asarray(torch_info[k], dtype=np.float64) for k in comparable}

    with np.errstate(invalid="ignore", over="ignore"):
        helper.compare_info(paddle_cmp, torch_cmp)
    means = {key: float(helper.diff_dict[key]["mean"]) for key in comparable}

    _write_reprod_report(helper, log_path, diff_threshold, skipped)
    for key in skipped:
        means[key] = 0.0 if skipped[key] == _EMPTY else float("nan")
    return means


_ECHO_REPROD_LOG = False


def echo_reprod_log(enabled: bool) -> None:
    """Whether reprod_log's per-key report lines also go to the console (they always go to
    the stage's ``<stage>_diff.log``)."""
    global _ECHO_REPROD_LOG
    _ECHO_REPROD_LOG = bool(enabled)


def _write_reprod_report(helper, log_path: str, diff_threshold: float, skipped: dict[str, str]) -> None:
    """Run ``helper.report`` into ``log_path`` atomically, then undo its logging side effects.

    reprod_log 1.0.1's report adds a stdout handler and a file handler to
    the root logger on every call and never removes them: left alone, every
    later log record of the process (including the next stage's report)
    would be appended to this stage's log file.
    """
    def write(tmp: str) -> None:
        root = logging.getLogger("root")
        handlers_before, level_before, propagate_before = list(root.handlers), root.level, root.propagate
        # Handlers other libraries put on that logger (Paddle adds a stderr one) would
        # print every line too: only reprod_log's own handlers see them.
        root.handlers = []
        root.propagate = False
        try:
            # Its stdout handler binds sys.stdout when it is made: the console gets
            # reprod_log's per-key lines only when asked for (`echo_reprod_log`).
            with contextlib.nullcontext() if _ECHO_REPROD_LOG else contextlib.redirect_stdout(io.StringIO()):
                helper.report(diff_method="mean", diff_threshold=diff_threshold, path=tmp)
        finally:
            for handler in root.handlers:
                handler.close()
            root.handlers = handlers_before
            root.setLevel(level_before)
            root.propagate = propagate_before
        if skipped:
            with open(tmp, "a", encoding="utf-8") as handle:
                for key, why in skipped.items():
                    handle.write(f"{key}: {why}\n")

    atomic_write(log_path, write)
