"""Shared evaluation: one process's detections as compact arrays, and their merge into dataset order.

No model and no processes: the shards are made by hand, as the ranks of a
job with the test sampler (every ``world_size``-th image from ``rank``) would
make them. The launched end-to-end check is ``tests/paddle_impl/engine/test_distributed_eval.py``.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from paddle_impl.evaluation.evaluate import ShardDetections, merge_shards


def _image(index: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` detections that name their image: boxes offset by ``index``."""
    rng = np.random.default_rng(index)
    boxes = (rng.random((count, 4)) * 50 + index).astype(np.float32)
    return boxes, rng.random(count).astype(np.float32), rng.integers(0, 80, count).astype(np.int64)


def _shards(size: int, world_size: int, counts=lambda i: i % 3) -> list[ShardDetections]:
    """Every rank's shard: the images ``rank, rank + world_size, ...``."""
    return [ShardDetections.from_images(list(range(rank, size, world_size)),
                                        [_image(i, counts(i)) for i in range(rank, size, world_size)])
            for rank in range(world_size)]


def _assert_same(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def test_shard_arrays_round_trip_through_pickle():
    """What all_gather_object sends: five arrays, each image's detections back intact, empty ones too."""
    indices = [4, 0, 2]
    images = [_image(4, 3), _image(0, 0), _image(2, 1)]
    shard = pickle.loads(pickle.dumps(ShardDetections.from_images(indices, images, seconds=1.5)))
    assert shard.bboxes.shape == (4, 4) and shard.bboxes.dtype == np.float32
    assert shard.scores.dtype == np.float32 and shard.labels.dtype == np.int64
    assert shard.counts.tolist() == [3, 0, 1] and shard.seconds == 1.5
    back = list(shard.images())
    assert [i for i, _ in back] == indices
    for (_, got), expected in zip(back, images, strict=True):
        _assert_same(got, expected)


@pytest.mark.parametrize("size, world_size", [(5, 2), (5, 3), (7, 3), (1, 2), (2, 3)])
def test_merge_puts_the_ranks_shares_back_in_dataset_order(size, world_size):
    merged = merge_shards(_shards(size, world_size), size)
    assert len(merged) == size
    for index, got in enumerate(merged):
        _assert_same(got, _image(index, index % 3))


def test_a_rank_without_images_takes_part():
    """Size 1 on 2 ranks: rank 1's shard is empty and well formed; the merge has the one image."""
    empty = ShardDetections.from_images([], [])
    assert empty.bboxes.shape == (0, 4) and empty.scores.shape == (0,) and list(empty.images()) == []
    merged = merge_shards([ShardDetections.from_images([0], [_image(0, 2)]), pickle.loads(pickle.dumps(empty))], 1)
    _assert_same(merged[0], _image(0, 2))


def test_merge_refuses_padding_duplicates_and_gaps():
    """Shares padded as the training sampler pads, or missing an image, are named, never scored."""
    shards = _shards(5, 2)
    padded = ShardDetections.from_images([1, 3, 0], [_image(1, 1), _image(3, 0), _image(0, 0)])
    with pytest.raises(ValueError, match="index 0 was predicted by rank 0 and rank 1"):
        merge_shards([shards[0], padded], 5)
    with pytest.raises(ValueError, match=r"1 of 5 images predicted by no rank \(dataset indices \[4\]"):
        merge_shards([ShardDetections.from_images([0, 2], [_image(0, 1), _image(2, 1)]), shards[1]], 5)
    with pytest.raises(ValueError, match="rank 1 predicted dataset index 5"):
        merge_shards([shards[0], ShardDetections.from_images([5], [_image(5, 1)])], 5)
