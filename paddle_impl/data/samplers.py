"""Sample order: which images, in which batches, on which rank, in which epoch.

Two layers, as in mmdet 3.3.0's loaders:

- :class:`DistributedSampler` gives the dataset indices of one rank for one epoch,
  in the order of mmengine's ``DefaultSampler(shuffle, round_up)``: a seeded
  permutation (bit-identical to ``torch.randperm`` under
  ``torch.Generator().manual_seed(seed + epoch)``) or, for testing, dataset
  order; then every ``world_size``-th index from ``rank``. Training rounds up
  (``round_up=True``): the order is first repeated from its start until its
  length divides by the world size, so every rank runs the same number of
  iterations, each a collective (the gradient average). Evaluation does not
  (``round_up=False``): the ranks' shares are disjoint and together hold every
  index exactly once, so each image is scored once without a trimming step;
  the shares may differ by one image and a rank may get none (more ranks than
  images), which is fine because prediction has no collective.
- :class:`BatchSampler` cuts that sequence into batches in order;
  :class:`AspectRatioBatchSampler` first sorts indices into a landscape bucket
  (``w >= h``) and a portrait bucket (``w < h``) and emits a bucket whenever it
  is full, as mmdet's ``AspectRatioBatchSampler`` does, including its tail rule
  (the leftovers of both buckets are joined, so the batches made of them at
  the end of an epoch may mix orientations).

A batch is a list of :class:`SampleKey`. The key carries the epoch, which keys
the random augmentation of that sample (see ``CocoDetection``), and the batch's
position, which says where to resume after that batch (:func:`resume_position`).
Because the order of an epoch is a pure function of ``(seed, epoch, rank,
world_size)``, resuming at ``(epoch, batch)`` replays the epoch's order and
skips the batches already consumed: the remaining batches are exactly those an
uninterrupted run would have seen.
"""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import paddle.distributed as dist


class SampleKey(NamedTuple):
    """One sample as the batch samplers hand it to the dataset.

    ``index``: dataset index. ``epoch``: the epoch it is drawn in. ``batch``:
    the index of its batch within the epoch on this rank, -1 when the sample
    was not drawn by a batch sampler.
    """

    index: int
    epoch: int = 0
    batch: int = -1


def resume_position(keys: Sequence[SampleKey]) -> dict[str, int]:
    """Where a batch sampler resumes after the batch made of ``keys`` was consumed.

    Pass the result to ``BatchSampler.load_state_dict``. A ``DataLoader``
    prefetches batches, so the sampler's own counter runs ahead of training;
    the keys of the last consumed batch do not.
    """
    if not keys or any(k.batch < 0 for k in keys):
        raise ValueError("resume_position needs keys drawn by a batch sampler (batch >= 0)")
    epochs = {k.epoch for k in keys}
    batches = {k.batch for k in keys}
    if len(epochs) != 1 or len(batches) != 1:
        raise ValueError(f"keys come from several batches: epochs {sorted(epochs)}, "
                         f"batches {sorted(batches)}")
    return {"epoch": epochs.pop(), "batch": batches.pop() + 1}


def torch_randperm(n: int, seed: int) -> list[int]:
    """``torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()``
    without torch.

    torch seeds a 32-bit Mersenne Twister with the low 32 bits of ``seed`` (the
    same initialisation as numpy's legacy ``RandomState(seed)``) and runs a
    Fisher-Yates shuffle, swapping position ``i`` with ``i + r_i % (n - i)`` for
    the raw 32-bit draws ``r_i``. torch keeps this path for ``n`` below
    2**32 / 20, far above any detection dataset.
    """
    if n < 0:
        raise ValueError(f"randperm of a negative size: {n}")
    if n >= 2**32 // 20:
        raise ValueError(f"randperm of {n} items: torch uses another generator path above 2**32/20")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    perm = list(range(n))
    if n < 2:
        return perm
    draws = np.random.RandomState(seed & 0xFFFFFFFF).randint(0, 2**32, size=n - 1, dtype=np.uint64)
    for i, r in enumerate(draws.tolist()):
        j = i + r % (n - i)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


class DistributedSampler:
    """Dataset indices of one rank, as mmengine's ``DefaultSampler(shuffle, round_up)``.

    Args:
        size: number of samples in the dataset.
        rank, world_size: this process's position; default from
            ``paddle.distributed`` (0 and 1 outside a launched job).
        shuffle: permute per epoch (training) or keep dataset order (testing).
        seed: the run's seed; epoch ``e`` is permuted with ``seed + e``. All
            ranks must use the same seed.
        round_up: pad every rank to the same length (training) or not (testing).

    With ``round_up`` every epoch each rank gets ``ceil(size / world_size)``
    indices; the ``total - size`` padding indices repeat the start of the
    epoch's order, so a few samples are seen twice per epoch when ``size`` does
    not divide. Without it rank ``r`` gets the ``ceil((size - r) / world_size)``
    indices at positions ``r, r + world_size, ...`` of the order: every index
    exactly once across the ranks, none at all on a rank ``>= size``.
    """

    def __init__(self, size: int, rank: int | None = None, world_size: int | None = None,
                 shuffle: bool = True, seed: int = 0, round_up: bool = True) -> None:
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
        if size <= 0:
            raise ValueError(f"cannot sample from an empty dataset (size {size})")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.size = size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.yielded = 0  # indices of the current epoch yielded so far
        self._resume_at = 0  # where the next iteration starts (set by load_state_dict)
        self.round_up = round_up
        if round_up:
            self.num_samples = math.ceil(size / world_size)
            self.total_size = self.num_samples * world_size
        else:
            self.num_samples = len(range(rank, size, world_size))
            self.total_size = size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its permutation); the next iteration starts at its first index."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = epoch
        self.yielded = 0
        self._resume_at = 0

    def epoch_indices(self) -> list[int]:
        """This rank's ``num_samples`` indices of the current epoch, in order."""
        if self.shuffle:
            order = torch_randperm(self.size, self.seed + self.epoch)
        else:
            order = list(range(self.size))
        repeats = self.total_size // self.size + 1
        padded = (order * repeats)[:self.total_size]
        return padded[self.rank:self.total_size:self.world_size]

    def __iter__(self) -> Iterator[int]:
        """The epoch's indices from its start, or from the position loaded last."""
        indices = self.epoch_indices()
        start, self._resume_at = self._resume_at, 0
        for position in range(start, len(indices)):
            self.yielded = position + 1
            yield indices[position]

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict[str, int]:
        """Position: ``epoch`` and ``index``, the number of its indices yielded so far."""
        return {"epoch": self.epoch, "index": self.yielded, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the next iteration continue epoch ``state['epoch']`` after its first
        ``state['index']`` indices."""
        self._check_same_run(state)
        if not 0 <= state["index"] <= self.num_samples:
            raise ValueError(f"index {state['index']} outside an epoch of {self.num_samples} samples")
        self.set_epoch(state["epoch"])
        self.yielded = self._resume_at = state["index"]

    def _check_same_run(self, state: dict[str, int]) -> None:
        for name in ("seed", "rank", "world_size"):
            if name in state and state[name] != getattr(self, name):
                raise ValueError(f"sampler state was saved with {name}={state[name]}, "
                                 f"this sampler has {name}={getattr(self, name)}")


class BatchSampler:
    """Consecutive batches of a :class:`DistributedSampler`'s indices.

    Yields lists of :class:`SampleKey`. Each iteration runs the current epoch
    from its first batch, or, once after :meth:`load_state_dict`, from the
    loaded position. The position is ``(epoch, batch)``: ``batch`` batches of
    the epoch were yielded so far.

    Args:
        sampler: the index sampler; this object drives its epoch.
        batch_size: samples per batch.
        drop_last: drop a final batch smaller than ``batch_size``.
    """

    def __init__(self, sampler: DistributedSampler, batch_size: int, drop_last: bool = False) -> None:
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.batch = 0  # batches of the current epoch yielded so far
        self._resume_at = 0  # where the next iteration starts (set by load_state_dict)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; the next iteration starts at its first batch."""
        self.sampler.set_epoch(epoch)
        self.batch = 0
        self._resume_at = 0

    def _batches(self, indices: Sequence[int]) -> Iterator[list[int]]:
        """The epoch's batches of dataset indices, from the rank's full index list."""
        for begin in range(0, len(indices), self.batch_size):
            batch = list(indices[begin:begin + self.batch_size])
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch = self.epoch
        start, self._resume_at = self._resume_at, 0
        self.batch = start
        # Grouping depends on every earlier index of the epoch, so the epoch is
        # always replayed from its start and the consumed batches skipped.
        for position, batch in enumerate(self._batches(self.sampler.epoch_indices())):
            if position < start:
                continue
            self.batch = position + 1
            yield [SampleKey(index, epoch, position) for index in batch]

    def __len__(self) -> int:
        """Batches per epoch, as mmdet counts them (with ``drop_last``, the tail
        rule of :class:`AspectRatioBatchSampler` can yield one fewer)."""
        if self.drop_last:
            return len(self.sampler) // self.batch_size
        return math.ceil(len(self.sampler) / self.batch_size)

    def state_dict(self) -> dict[str, int]:
        """Position ``epoch``, ``batch`` (batches yielded) plus the run identity."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.sampler.seed,
                "rank": self.sampler.rank, "world_size": self.sampler.world_size,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the next iteration continue epoch ``state['epoch']`` after its first
        ``state['batch']`` batches."""
        self.sampler._check_same_run(state)
        if "batch_size" in state and state["batch_size"] != self.batch_size:
            raise ValueError(f"sampler state was saved with batch_size={state['batch_size']}, "
                             f"this sampler has batch_size={self.batch_size}")
        if not 0 <= state["batch"] <= len(self):
            raise ValueError(f"batch {state['batch']} outside an epoch of {len(self)} batches")
        self.set_epoch(state["epoch"])
        self.batch = self._resume_at = state["batch"]


class AspectRatioBatchSampler(BatchSampler):
    """Batches within one orientation, as mmdet's ``AspectRatioBatchSampler``.

    Args:
        sampler, batch_size, drop_last: as :class:`BatchSampler`.
        portrait: for every dataset index, whether its image is portrait
            (``width < height`` from the annotation file); square images go with
            the landscape ones.

    Indices are appended to their orientation's bucket in sampler order; a full
    bucket is emitted at once. At the end of the epoch the two remainders are
    joined, portrait first, and cut into batches, which may mix orientations
    (mmdet does exactly this). With ``drop_last`` mmdet drops the
    last of those tail batches even when it is full; so does this class.
    """

    def __init__(self, sampler: DistributedSampler, portrait: Sequence[bool], batch_size: int,
                 drop_last: bool = False) -> None:
        super().__init__(sampler, batch_size, drop_last)
        if len(portrait) != sampler.size:
            raise ValueError(f"portrait flags for {len(portrait)} images, sampler over {sampler.size}")
        self.portrait = [bool(p) for p in portrait]

    def _batches(self, indices: Sequence[int]) -> Iterator[list[int]]:
        buckets: tuple[list[int], list[int]] = ([], [])  # (portrait, landscape) as mmdet's 0 and 1
        for index in indices:
            bucket = buckets[0] if self.portrait[index] else buckets[1]
            bucket.append(index)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()
        left = buckets[0] + buckets[1]
        while left:
            if len(left) <= self.batch_size:
                if not self.drop_last:
                    yield left
                return
            yield left[:self.batch_size]
            left = left[self.batch_size:]
