"""The training DataLoader loads ahead: the next batch is prepared while the current one is in use.

A dataset that leaves a marker file for every sample it makes shows, from
outside the loader, which samples were loaded. After the first batch is taken
and before the second is asked for, the second batch's samples must appear
(with two workers, in the worker processes; without workers, in the loader's
reading thread). A loader that made each batch only when asked would never
produce them, and the wait for them runs out. The batches still come in the
batch sampler's order.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from paddle_impl.data import tiny_coco
from paddle_impl.data.dataset import CocoDetection, build_dataloader
from paddle_impl.data.samplers import SampleKey

# Long enough for a loaded machine to make two 96x128 samples; a loader that
# does not load ahead never produces them, however long the wait.
WAIT_FOR_PREFETCH_S = 60


class MarkingDataset(CocoDetection):
    """:class:`CocoDetection` that touches ``marks/<index>`` for every sample it makes."""

    def __init__(self, marks: Path, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.marks = marks

    def __getitem__(self, key):
        sample = super().__getitem__(key)
        (self.marks / str(SampleKey(*sample["key"]).index)).touch()
        return sample


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return tiny_coco.generate(tmp_path_factory.mktemp("data") / "coco", train=10, val=1, seed=0,
                              size=(96, 128))


@pytest.mark.parametrize("workers", [0, 2])
def test_next_batch_is_loaded_before_it_is_asked_for(coco, tmp_path, workers):
    marks = tmp_path / "marks"
    marks.mkdir()
    dataset = MarkingDataset(marks, str(coco / "annotations" / "instances_train2017.json"),
                             str(coco / "train2017"), train=True, seed=0, scale=(128, 96))
    loader = build_dataloader(dataset, batch_size=2, num_workers=workers, seed=0, rank=0, world_size=1)
    loader.batch_sampler.set_epoch(0)
    planned = [[k.index for k in keys] for keys in loader.batch_sampler]
    assert len(planned) >= 3
    loader.batch_sampler.set_epoch(0)

    batches = iter(loader)
    first = next(batches)
    deadline = time.monotonic() + WAIT_FOR_PREFETCH_S
    while not all((marks / str(index)).exists() for index in planned[1]):
        assert time.monotonic() < deadline, (
            f"batch 2 {planned[1]} was not loaded while batch 1 was in use (num_workers={workers}): "
            f"the loader does not load ahead; loaded so far {sorted(p.name for p in marks.iterdir())}")
        time.sleep(0.05)

    got = [[k.index for k in first["keys"]]] + [[k.index for k in b["keys"]] for b in batches]
    assert got == planned, "prefetching must not change which batches come or their order"
