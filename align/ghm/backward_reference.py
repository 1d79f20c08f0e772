"""mmdet's side of one backward-stage run of the GHM RetinaNet: computed, computed and recorded, or replayed.

Without the cache, mmdet's model trains as `align.ghm.sides.MmdetSide`. With
it (``opts.cache``), the run is looked up in ``build_dir/cache`` under the
SHA-256 of everything mmdet's results depend on: the checkpoint, the batches
themselves, the precision, learning rate, warm-up, clipping bound and step
count, whether per-element GHM values are kept, the installed reference
versions and the source of the code that builds and records the reference.

- On a miss the run is computed and recorded as it goes
  (`align.engine.replay.RecordingSide`): every step's gradients, parameters,
  momentum buffers, GHM ``acc_sum``, losses, gradient norm and learning rate,
  and what the stage's diagnostics saw in mmdet's forward pass
  (`align.ghm.backward.GhmDiagnostics.reference_extras`): every ReLU call's
  mask (for the census of mask flips) and every GHM call's bin counts and, in
  float32, its per-element g (for the bin-flip explanation).
- On a hit mmdet's model is not even built: `align.engine.replay.ReplaySide`
  gives the recorded values back step by step, and the diagnostics read the
  recorded masks and g.

mmengine's learning rate over the whole schedule (`mmengine_schedule`) is
kept the same way.

A float64 run of the default batch records about 9 GB, a float32 one about
half; every file is checked against its digest before a hit is used.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

from align.engine.cache import ReferenceCache, cache_key
from align.engine.environment import source_digest
from align.engine.replay import RecordingSide, ReplaySide
from align.ghm.pair import Checkpoints, build_torch_model
from align.ghm.schedule import mmengine_lrs
from align.ghm.sides import FakeInputs, MmdetSide
from align.ghm.suite import reference_threads, reference_versions

# The code that builds mmdet's side and records what the stage reads of it.
REFERENCE_CODE = ("torch_ref", "align.ghm", "align.engine.replay", "align.engine.capture",
                  "align.backward.lockstep")


@dataclass
class Reference:
    """mmdet's side of a run as the backward stage drives it.

    Attributes:
        side: the `align.engine.paired.Side` (`MmdetSide`, recorded or replayed).
        torch_model: mmdet's model, None when replayed.
        max_norm: the clipping bound mmdet's side uses.
        status: "off" (no cache), "miss", "mismatch", "fresh" (computed and recorded) or "hit".
        check_s: seconds spent looking the run up in the cache (reading it and checking every digest).
    """

    side: Any
    torch_model: Any
    max_norm: float
    status: str
    check_s: float = 0.0


def batches_digest(batches: Sequence[FakeInputs]) -> str:
    """SHA-256 of the batches' images and ground truth."""
    digest = hashlib.sha256()
    for batch in batches:
        truth = batch.truth
        digest.update(repr((batch.images.shape, truth.batch_shape, truth.img_shapes, truth.pad_shapes)).encode())
        for array in [batch.images, *truth.gt_bboxes, *truth.gt_labels]:
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def mmengine_schedule(*, cache_dir, use_cache: bool, fresh: bool) -> Callable[[int], np.ndarray]:
    """`align.ghm.schedule.mmengine_lrs`, kept in the cache (as the runs are) when ``use_cache``."""
    if not use_cache:
        return mmengine_lrs

    def lrs(iters_per_epoch: int) -> np.ndarray:
        key = cache_key({"stage": "backward.lr_schedule", "format": 1, "iters_per_epoch": iters_per_epoch,
                         "versions": reference_versions(), "code": source_digest(*REFERENCE_CODE)})
        cache = ReferenceCache(cache_dir)
        arrays = None if fresh else cache.load("lr-schedule", key)
        if arrays is None:
            arrays = {"lr": mmengine_lrs(iters_per_epoch)}
            cache.save("lr-schedule", key, arrays)
        return np.asarray(arrays["lr"])

    return lrs


@contextlib.contextmanager
def mmdet_reference(ckpts: Checkpoints, dtype: str, batches: Sequence[FakeInputs], settings: dict, *,
                    keep_g: bool, cache_dir, use_cache: bool, fresh: bool,
                    extras: Optional[Callable[[], Mapping[str, np.ndarray]]] = None) -> Iterator[Reference]:
    """mmdet's side of a run (see the module docstring), inside a ``with`` block.

    ``settings``: `MmdetSide`'s ``lr``, ``warmup``, ``iters_per_epoch`` and ``max_norm``;
    ``extras``: what a recording keeps per step beside the side's own values.
    A recording becomes a cache entry only when the block ends without an exception.
    """
    key = cache_key({"stage": "backward", "format": 1, "checkpoint": ckpts.sha256, "dtype": dtype,
                     "batches": batches_digest(batches), "steps": len(batches), "settings": settings,
                     "ghm_g": keep_g, "versions": reference_versions(), "torch_threads": reference_threads(),
                     "code": source_digest(*REFERENCE_CODE)})
    cache = ReferenceCache(cache_dir)
    name = f"backward-{dtype}"
    start = time.perf_counter()
    arrays = cache.load(name, key) if use_cache and not fresh else None
    check_s = time.perf_counter() - start
    if arrays is not None:
        yield Reference(side=ReplaySide("mmdet", arrays), torch_model=None, max_norm=float(arrays["max_norm"]),
                        status="hit", check_s=check_s)
        return
    live = MmdetSide(build_torch_model(ckpts, dtype), **settings)
    status = "off" if not use_cache else "fresh" if fresh else cache.last_status
    reference = Reference(side=live, torch_model=live.model, max_norm=live.max_norm, status=status, check_s=check_s)
    if not use_cache:
        yield reference
        return
    with cache.writer(name, key) as entry:
        entry.add("max_norm", np.float64(live.max_norm))
        reference.side = RecordingSide(live, entry, extras=extras)
        yield reference
