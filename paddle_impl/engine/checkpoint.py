"""Training checkpoints: what a run needs to continue exactly, written atomically.

A checkpoint is one pickle file (protocol 4) holding a dict whose tensors are
all numpy arrays, so it loads without Paddle objects or a model::

    format        'ghm-retinanet-train/1'
    iter          global iterations completed (the next one to run is ``iter``, 0-based)
    epoch         the epoch (0-based) the next iteration belongs to
    world_size    processes of the run; a resume must use the same number
    model         rank 0's ``state_dict()``, GHM buffers ``bbox_head.loss_cls.acc_sum`` /
                  ``bbox_head.loss_bbox.acc_sum`` included
    ghm_per_rank  per rank, that rank's GHM buffers (``{key: array}``): every
                  process keeps its own momentum statistics, as mmdet's
                  distributed training does, so each one is restored to its own
    optimizer     ``SGD.state_dict()``: lr, momentum, weight decay, momentum buffers
    lr_schedule   ``WarmupMultiStepLR.state_dict()``
    sampler       ``{'epoch', 'batch'}``: the next batch to draw (same on every rank)
    rng           per rank ``{'python', 'numpy', 'paddle'}`` generator states
    run           the arguments and derived settings of the run (for the record)
    config        ``{'--option': value}``: the effective value of each option that changes
                  what training computes, which a resume compares with its own command
                  (absent from checkpoints written before it was recorded)
    config_changes  ``[{'iter', 'option', 'old', 'new'}]``: the options a resume with
                  ``--allow-config-change`` changed, oldest first, carried from resume to resume

Writing goes to a temporary file in the destination folder, flushed to disk,
then renamed over the destination (`atomic_save`): a crash at any moment
leaves either the previous checkpoint or the complete new one. Reading
(`load_checkpoint`) never runs code from the file (:mod:`paddle_impl.engine.safe_load`).

Beside the checkpoint a run keeps each epoch's weights, ``epoch_{E}.pdparams``;
`prune_epoch_weights` bounds how many of them stay on disk.
"""
from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import paddle

from paddle_impl.engine import safe_load
from common.atomic_write import atomic_write

FORMAT = "ghm-retinanet-train/1"
REQUIRED_KEYS = ("format", "iter", "epoch", "world_size", "model", "ghm_per_rank", "optimizer",
                 "lr_schedule", "sampler", "rng")
# The GHM losses' running statistics: per process, never averaged across ranks.
GHM_BUFFER_KEYS = ("bbox_head.loss_cls.acc_sum", "bbox_head.loss_bbox.acc_sum")
# The class ``paddle.get_rng_state()`` returns; pybind rebuilds it from plain numbers.
_GENERATOR_STATE = ("paddle.base.libpaddle", "GeneratorState")


# The weights a run writes after epoch E (1-based).
EPOCH_WEIGHTS = re.compile(r"epoch_(\d+)\.pdparams")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit this run; the message names the file."""


def to_numpy_tree(obj: Any) -> Any:
    """``obj`` with every Paddle tensor replaced by a numpy copy (dicts, lists, tuples recursed)."""
    if isinstance(obj, paddle.Tensor):
        return obj.numpy().copy()
    if isinstance(obj, Mapping):
        return {k: to_numpy_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_numpy_tree(v) for v in obj)
    return obj


def atomic_save(obj: Any, path: str | os.PathLike,
                save_fn: Callable[[Any, str], None] | None = None) -> Path:
    """Write ``obj`` to ``path`` with ``save_fn`` (default: pickle protocol 4) through
    :func:`~common.atomic_write.atomic_write`: ``path`` is either untouched or
    completely replaced, and a failed write raises a ``WriteError`` naming it."""
    save_fn = save_fn or _pickle_to
    return atomic_write(path, lambda tmp: save_fn(obj, tmp))


def prune_epoch_weights(folder: str | os.PathLike, newest_epoch: int, keep: int) -> list[Path]:
    """Remove the ``epoch_{E}.pdparams`` of ``folder`` with ``E <= newest_epoch - keep``.

    Call once ``epoch_{newest_epoch}.pdparams`` is completely written, so the
    last ``keep`` epochs' files (that one included) stay. ``keep`` 0 keeps every
    file. Files of later epochs (left by an earlier run in the folder) and every
    other file, ``latest.ckpt`` and ``model_final.pdparams`` included, are not
    touched. Returns the removed files, oldest first.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0 (0 keeps every epoch), got {keep}")
    if keep == 0:
        return []
    old = []
    for path in Path(folder).iterdir():
        match = EPOCH_WEIGHTS.fullmatch(path.name)
        if match and int(match.group(1)) <= newest_epoch - keep and path.is_file():
            old.append((int(match.group(1)), path))
    removed = []
    for _, path in sorted(old):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _pickle_to(obj: Any, file_name: str) -> None:
    with open(file_name, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a checkpoint written by :func:`atomic_save` of a training state.

    The file is read by :mod:`paddle_impl.engine.safe_load`, which runs nothing from
    it. Raises :class:`CheckpointError` naming ``path`` when the file is
    missing, cannot be unpickled, is not a training checkpoint or lacks a key,
    and :class:`~paddle_impl.engine.safe_load.UnsafeFileError` when it names a
    global other than those of arrays and containers.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = safe_load.load(path)
    except safe_load.UnsafeFileError:
        raise
    except safe_load.UnreadableFileError as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({str(err).split(': ', 1)[-1]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a training checkpoint of format {FORMAT!r} (found {found!r}); "
                              "model weights (.pdparams) go to --init, not --resume")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    return state


def rng_state() -> dict[str, Any]:
    """This process's generator states: ``python`` (``random``), ``numpy`` (legacy global),
    ``paddle`` (``paddle.get_rng_state()``, pickled because its objects are opaque)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "paddle": pickle.dumps(paddle.get_rng_state())}


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(_as_python_state(state["python"]))
    np.random.set_state(state["numpy"])
    # The Paddle generators' pickle, read admitting only their own state class.
    generators = safe_load.loads(state["paddle"], "the checkpoint's Paddle RNG state",
                                 extra_globals=[_GENERATOR_STATE])
    paddle.set_rng_state(generators)


def _as_python_state(state: Any) -> tuple:
    """``random.setstate`` wants nested tuples; a save/load round trip may give lists."""
    version, internal, gauss = state
    return (version, tuple(int(v) for v in internal), gauss)


def ghm_buffers(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The GHM momentum buffers of a model state dict, as numpy arrays."""
    missing = [k for k in GHM_BUFFER_KEYS if k not in state_dict]
    if missing:
        raise KeyError(f"model state has no GHM buffers {missing}")
    return {k: np.asarray(to_numpy_tree(state_dict[k])).copy() for k in GHM_BUFFER_KEYS}
