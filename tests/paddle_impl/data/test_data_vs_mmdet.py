"""The data side against mmdet 3.3.0's own dataset, pipelines, preprocessor and samplers.

mmdet's pieces are built from the GHM config it ships, pointed at a tiny COCO
written to a temporary folder. The random flip is forced on both sides (mmdet's
``RandomFlip`` with prob 1.0 or 0.0, ours with ``flip=True/False``).
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from paddle_impl.data import tiny_coco
from paddle_impl.data.coco_classes import COCO_CATEGORY_IDS, COCO_CLASSES
from paddle_impl.data.dataset import CocoDetection, build_dataloader
from paddle_impl.data.samplers import (AspectRatioBatchSampler, BatchSampler, DistributedSampler,
                                  resume_position, torch_randperm)
from paddle_impl.data.transforms import Collate, rescale_size, resize_keep_ratio

TRAIN_ANN = "annotations/instances_train2017.json"
VAL_ANN = "annotations/instances_val2017.json"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    # Two images beyond the fixed roles of each split, so random ones are covered too.
    return tiny_coco.generate(tmp_path_factory.mktemp("data") / "coco", train=10, val=5, seed=0)


@pytest.fixture(scope="module")
def mm():
    """mmdet's registries, config and data preprocessor."""
    from mmdet.registry import DATASETS, MODELS
    from mmdet.utils import register_all_modules

    from torch_ref.reference import load_config, quiet_mmengine

    register_all_modules(init_default_scope=True)
    quiet_mmengine()
    cfg = load_config()
    return {"cfg": cfg, "DATASETS": DATASETS, "preprocessor": MODELS.build(cfg.model.data_preprocessor)}


def mmdet_dataset(mm, root: Path, train: bool, ann_file: str | None = None, flip_prob: float | None = None):
    """mmdet's ``CocoDataset`` of the config's train or val loader, on ``root``."""
    cfg = copy.deepcopy(mm["cfg"].train_dataloader.dataset if train else mm["cfg"].val_dataloader.dataset)
    split = "train2017" if train else "val2017"
    cfg.data_root = str(root)
    cfg.ann_file = ann_file or f"annotations/instances_{split}.json"
    cfg.data_prefix = dict(img=f"{split}/")
    for step in cfg.pipeline:
        if step["type"] == "RandomFlip":
            step["prob"] = flip_prob
    return mm["DATASETS"].build(cfg)


def ours(root: Path, train: bool, ann_file: str | None = None, flip: bool | None = None, **kwargs):
    split = "train2017" if train else "val2017"
    return CocoDetection(root / (ann_file or f"annotations/instances_{split}.json"), root / split,
                         train=train, flip=flip, **kwargs)


def assert_same_batch(mm, mm_data: list[dict], our_batch: dict, training: bool) -> None:
    """mmdet's packed samples through its DetDataPreprocessor vs our collated batch."""
    out = mm["preprocessor"]({"inputs": [d["inputs"] for d in mm_data],
                              "data_samples": [d["data_samples"] for d in mm_data]}, training=training)
    expected = out["inputs"].numpy()
    got = our_batch["images"].numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-6
    assert our_batch["batch_input_shape"] == tuple(expected.shape[2:])
    for i, sample in enumerate(out["data_samples"]):
        assert our_batch["img_ids"][i] == sample.img_id
        assert our_batch["ori_shapes"][i] == tuple(sample.ori_shape)
        assert our_batch["img_shapes"][i] == tuple(sample.img_shape)
        assert our_batch["pad_shapes"][i] == tuple(sample.pad_shape)
        assert our_batch["scale_factors"][i] == tuple(sample.scale_factor)
        if "flip" in sample:
            assert our_batch["flips"][i] == sample.flip
        for ours_key, instances in (("", sample.gt_instances), ("_ignore", sample.ignored_instances)):
            np.testing.assert_array_equal(our_batch["gt_bboxes" + ours_key][i].numpy(),
                                          instances.bboxes.numpy().reshape(-1, 4))
            np.testing.assert_array_equal(our_batch["gt_labels" + ours_key][i].numpy(),
                                          instances.labels.numpy())


def compare_pipelines(mm, mm_ds, our_ds, training: bool, batch_size: int = 2) -> None:
    assert our_ds.img_ids == [mm_ds.get_data_info(i)["img_id"] for i in range(len(mm_ds))]
    collate = Collate()
    for begin in range(0, len(our_ds), batch_size):
        indices = range(begin, min(begin + batch_size, len(our_ds)))
        assert_same_batch(mm, [mm_ds[i] for i in indices], collate.batch([our_ds[i] for i in indices]), training)


# ----------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("height, width", [(320, 401), (401, 320), (291, 392), (24, 425), (800, 1333),
                                           (1000, 3000), (7, 5), (333, 333)])
def test_resize_matches_mmcv(height, width):
    import mmcv

    # 320 x 401 scales by exactly 2.5 to a width of 1002.5: mmcv rounds half up.
    img = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected, factor = mmcv.imrescale(img, (1333, 800), return_scale=True)
    assert rescale_size(width, height, (1333, 800)) == mmcv.rescale_size((width, height), (1333, 800))
    got, (w_scale, h_scale) = resize_keep_ratio(img, (1333, 800))
    np.testing.assert_array_equal(got, expected)
    assert (w_scale, h_scale) == (expected.shape[1] / width, expected.shape[0] / height)


def test_classes_and_labels_match_mmdet(mm, coco_root):
    from mmdet.datasets import CocoDataset

    assert COCO_CLASSES == tuple(CocoDataset.METAINFO["classes"])
    mm_ds = mmdet_dataset(mm, coco_root, train=True, flip_prob=0.0)
    ds = ours(coco_root, train=True)
    assert ds.cat2label == mm_ds.cat2label
    assert [COCO_CATEGORY_IDS[label] for label in range(80)] == ds.cat_ids


@pytest.mark.parametrize("flip", [True, False])
def test_train_pipeline_matches_mmdet(mm, coco_root, flip):
    mm_ds = mmdet_dataset(mm, coco_root, train=True, flip_prob=1.0 if flip else 0.0)
    ds = ours(coco_root, train=True, flip=flip)
    # The tiny COCO's image 6 has no annotation and image 7 is 24 px high.
    assert 6 not in ds.img_ids and 7 not in ds.img_ids and 5 in ds.img_ids
    compare_pipelines(mm, mm_ds, ds, training=True)


def test_test_pipeline_matches_mmdet(mm, coco_root):
    mm_ds = mmdet_dataset(mm, coco_root, train=False)
    ds = ours(coco_root, train=False)
    assert len(ds) == 5  # a test set keeps the image without annotations
    compare_pipelines(mm, mm_ds, ds, training=False, batch_size=3)


def _write_png(path: Path, height: int, width: int) -> None:
    cv2.imwrite(str(path), np.full((height, width, 3), 127, np.uint8))


@pytest.fixture(scope="module")
def edge_root(coco_root, tmp_path_factory) -> Path:
    """The tiny COCO's train split plus annotations and images on the edges of mmdet's rules."""
    root = tmp_path_factory.mktemp("edge")
    shutil.copytree(coco_root / "train2017", root / "train2017")
    data = json.loads((coco_root / TRAIN_ANN).read_text())
    data["categories"].append({"id": 200, "name": "unicorn", "supercategory": "myth"})
    image = next(img for img in data["images"] if img["id"] == 1)
    width, height = image["width"], image["height"]
    next_id = iter(range(9000, 10000))

    def ann(img_id, bbox, area=100.0, category_id=1, **extra):
        data["annotations"].append({"id": next(next_id), "image_id": img_id, "category_id": category_id,
                                    "bbox": bbox, "area": area, "iscrowd": 0, **extra})

    ann(1, [10, 10, 0, 20])                       # zero width: skipped
    ann(1, [10, 10, 0.5, 20])                     # width < 1: skipped
    ann(1, [50, 50, 20, -5])                      # negative height: skipped
    ann(1, [width + 5, 10, 20, 20])               # outside the image: skipped
    ann(1, [-20.5, height - 30.25, 60.75, 50])    # partly outside: kept, clipped by the resize
    ann(1, [100, 100, 30, 30], area=0)            # zero area: skipped
    ann(1, [120, 20, 30, 30], ignore=True)        # ignore: skipped
    ann(1, [20, 120, 30, 30], category_id=200)    # not a COCO class: skipped
    ann(1, [width - 1.5, 5, 30, 40], category_id=18, iscrowd=1)  # crowd on the border

    def add_image(img_id, height, width, *anns):
        name = f"edge_{img_id}.png"
        _write_png(root / "train2017" / name, height, width)
        data["images"].append({"id": img_id, "file_name": name, "height": height, "width": width})
        for bbox, kwargs in anns:
            ann(img_id, bbox, **kwargs)

    box = [4, 4, 20, 20]
    add_image(50, 64, 96, (box, dict(area=0)))            # only a degenerate box: kept, no gt
    add_image(51, 64, 96, (box, dict(category_id=200)))   # only a non-COCO class: dropped
    add_image(52, 64, 96, (box, dict(ignore=True)))       # only an ignored box: kept, no gt
    add_image(53, 32, 96, (box, {}))                      # min side 32: kept
    add_image(54, 96, 31, (box, {}))                      # min side 31: dropped
    add_image(55, 64, 96)                                 # no annotation: dropped
    (root / "annotations").mkdir()
    (root / TRAIN_ANN).write_text(json.dumps(data))
    return root


def test_edge_annotations_match_mmdet(mm, edge_root):
    mm_ds = mmdet_dataset(mm, edge_root, train=True, flip_prob=1.0)
    ds = ours(edge_root, train=True, flip=True)
    kept = set(ds.img_ids)
    assert {50, 52, 53} <= kept and not {51, 54, 55} & kept
    first = ds.records[ds.img_ids.index(1)]
    assert len(first.labels) == 3 + 2  # the image's own three objects, the partly-outside box, the crowd
    for i in range(len(ds)):
        instances = mm_ds.get_data_info(i)["instances"]
        record = ds.records[i]
        np.testing.assert_array_equal(record.boxes, np.array([x["bbox"] for x in instances],
                                                             np.float32).reshape(-1, 4))
        assert record.labels.tolist() == [x["bbox_label"] for x in instances]
        assert record.ignore.tolist() == [bool(x["ignore_flag"]) for x in instances]
    compare_pipelines(mm, mm_ds, ds, training=True)


def test_test_set_keeps_every_image(mm, edge_root):
    mm_ds = mmdet_dataset(mm, edge_root, train=False, ann_file=TRAIN_ANN)
    ds = CocoDetection(edge_root / TRAIN_ANN, edge_root / "train2017", train=False)
    assert ds.img_ids == [mm_ds.get_data_info(i)["img_id"] for i in range(len(mm_ds))]
    assert {51, 54, 55} <= set(ds.img_ids)


@pytest.mark.parametrize("order", ["reversed", "subset"])
def test_label_order_follows_the_file_as_in_mmdet(mm, coco_root, tmp_path, order):
    data = json.loads((coco_root / TRAIN_ANN).read_text())
    used = {a["category_id"] for a in data["annotations"]}
    if order == "reversed":
        data["categories"] = data["categories"][::-1]
    else:
        data["categories"] = [c for c in data["categories"] if c["id"] in used]
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(data))
    mm_ds = mmdet_dataset(mm, coco_root, train=True, ann_file=str(ann_file), flip_prob=0.0)
    ds = CocoDetection(ann_file, coco_root / "train2017", train=True)
    assert ds.cat2label == mm_ds.cat2label
    for i in range(len(ds)):
        assert ds.records[i].labels.tolist() == [x["bbox_label"] for x in mm_ds.get_data_info(i)["instances"]]


# ----------------------------------------------------------------------------- bad input


def _edited_copy(coco_root: Path, tmp_path: Path, edit) -> Path:
    data = json.loads((coco_root / TRAIN_ANN).read_text())
    edit(data)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_missing_image_names_file_and_id(coco_root, tmp_path):
    images = tmp_path / "train2017"
    shutil.copytree(coco_root / "train2017", images)
    (images / "000000000002.png").unlink()
    ds = CocoDetection(coco_root / TRAIN_ANN, images, train=True)
    with pytest.raises(FileNotFoundError, match=r"000000000002\.png.*image id 2"):
        ds[ds.img_ids.index(2)]


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_unreadable_image_names_file_and_id(coco_root, tmp_path, content):
    images = tmp_path / "train2017"
    shutil.copytree(coco_root / "train2017", images)
    (images / "000000000003.png").write_bytes(content)
    ds = CocoDetection(coco_root / TRAIN_ANN, images, train=True)
    with pytest.raises(ValueError, match=r"000000000003\.png.*image id 3"):
        ds[ds.img_ids.index(3)]


def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        CocoDetection(tmp_path / "nothing.json", tmp_path, train=True)


def test_malformed_json_names_file(coco_root, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text((coco_root / TRAIN_ANN).read_text()[:500])
    with pytest.raises(ValueError, match=r"broken\.json.*not valid JSON"):
        CocoDetection(path, coco_root / "train2017", train=True)


def _drop_bbox(data):
    del data["annotations"][3]["bbox"]


def _short_bbox(data):
    data["annotations"][3]["bbox"] = [1, 2, 3]


def _unknown_image(data):
    data["annotations"][3]["image_id"] = 777


def _duplicate_ann_id(data):
    data["annotations"][3]["id"] = data["annotations"][2]["id"]


def _missing_area(data):
    del data["annotations"][3]["area"]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(categories=[]), "category list is empty"),
    (lambda d: [c.update(name=c["name"] + "_x") for c in d["categories"]], "none of its categories"),
    (lambda d: d.pop("images"), "'images' must be a list"),
    (lambda d: d["images"][1].pop("file_name"), "image id 2: needs a non-empty string 'file_name'"),
    (lambda d: d["images"][1].update(width=0), "image id 2: 'width' must be a positive integer"),
    (lambda d: d["images"].append(dict(d["images"][0])), "image id 1 appears twice"),
    (_drop_bbox, r"annotation id 4 \(image id 2\): 'bbox' must be 4 finite numbers"),
    (_short_bbox, r"annotation id 4 \(image id 2\): 'bbox'"),
    (_missing_area, r"annotation id 4 \(image id 2\): 'area'"),
    (_unknown_image, r"annotation id 4 \(image id 777\): refers to an image"),
    (_duplicate_ann_id, r"annotation id 3 .*appears twice"),
    (lambda d: d.update(annotations=[]), "no images left"),
])
def test_malformed_annotations_are_named(coco_root, tmp_path, edit, message):
    path = _edited_copy(coco_root, tmp_path, edit)
    with pytest.raises(ValueError, match=message) as info:
        CocoDetection(path, coco_root / "train2017", train=True)
    assert "instances.json" in str(info.value)


def test_test_set_rejects_forced_flip(coco_root):
    with pytest.raises(ValueError, match="does not flip"):
        ours(coco_root, train=False, flip=True)


# ----------------------------------------------------------------------------- samplers


def test_randperm_is_torchs():
    for seed in (0, 1, 7, 12345, 2**32 - 1, 2**32 + 5):
        for n in (1, 2, 5, 17, 1000):
            expected = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
            assert torch_randperm(n, seed) == expected, (seed, n)


def _mmengine_sampler(dataset, shuffle, seed, rank, world_size, round_up=True):
    from mmengine.dataset import DefaultSampler

    sampler = DefaultSampler(dataset, shuffle=shuffle, seed=seed, round_up=round_up)
    # A single process stands in for every rank of a job.
    sampler.rank, sampler.world_size = rank, world_size
    if round_up:
        sampler.num_samples = -(-len(dataset) // world_size)
        sampler.total_size = sampler.num_samples * world_size
    else:
        sampler.num_samples = -(-(len(dataset) - rank) // world_size)
        sampler.total_size = len(dataset)
    return sampler


@pytest.mark.parametrize("size", [7, 12])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_distributed_sampler_matches_mmengine(size, world_size):
    for shuffle in (True, False):
        for rank in range(world_size):
            ref = _mmengine_sampler(range(size), shuffle, 3, rank, world_size)
            ours_ = DistributedSampler(size, rank=rank, world_size=world_size, shuffle=shuffle, seed=3)
            for epoch in range(3):
                ref.set_epoch(epoch)
                ours_.set_epoch(epoch)
                assert list(ours_) == list(ref)
                assert len(ours_) == len(ref)


@pytest.mark.parametrize("size, world_size", [(10, 3), (12, 4), (5, 8)])
def test_every_index_once_per_epoch_with_padding(size, world_size):
    per_rank = []
    for rank in range(world_size):
        sampler = DistributedSampler(size, rank=rank, world_size=world_size, seed=11)
        sampler.set_epoch(4)
        per_rank.append(list(sampler))
    num_samples = -(-size // world_size)
    assert all(len(r) == num_samples for r in per_rank)
    drawn = [index for position in range(num_samples) for r in per_rank for index in r[position:position + 1]]
    order = torch_randperm(size, 11 + 4)
    # Rank-interleaved, the ranks' lists are the epoch's permutation, padded with its own start.
    assert drawn == (order * (world_size + 1))[:num_samples * world_size]
    assert sorted(set(drawn)) == list(range(size))


@pytest.mark.parametrize("size, world_size", [(5, 2), (5, 3), (1, 2), (2, 3), (6, 3), (7, 1)])
def test_test_sampler_gives_every_index_once(size, world_size):
    """Without round-up (evaluation) the ranks' shares are disjoint, cover the set, differ by at
    most one index, and a rank beyond the set gets an empty share (and zero batches)."""
    shares = []
    for rank in range(world_size):
        sampler = DistributedSampler(size, rank=rank, world_size=world_size, shuffle=False, round_up=False)
        share = list(sampler)
        assert len(share) == len(sampler), (rank, share)
        assert share == list(_mmengine_sampler(range(size), False, 0, rank, world_size, round_up=False))
        batches = list(BatchSampler(sampler, 2))
        assert len(batches) == len(BatchSampler(sampler, 2))
        assert [k.index for b in batches for k in b] == share
        shares.append(share)
    assert sorted(i for share in shares for i in share) == list(range(size))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    if size < world_size:
        assert shares[-1] == [] and shares[0] == [0]


@pytest.mark.parametrize("world_size", [2, 3])
def test_test_loaders_of_the_ranks_read_every_image_once(coco_root, world_size):
    ds = ours(coco_root, train=False)
    seen = []
    for rank in range(world_size):
        loader = build_dataloader(ds, num_workers=0, rank=rank, world_size=world_size)
        seen += [(k.index, img_id) for b in loader for k, img_id in zip(b["keys"], b["img_ids"])]
    assert len(ds) % world_size, "the set must not divide evenly for this test"
    assert sorted(seen) == list(enumerate(ds.img_ids))


def _train_sets(mm, coco_root):
    return mmdet_dataset(mm, coco_root, train=True, flip_prob=0.0), ours(coco_root, train=True)


@pytest.mark.parametrize("world_size", [1, 2])
def test_aspect_ratio_batches_match_mmdet(mm, coco_root, world_size):
    from mmdet.datasets.samplers import AspectRatioBatchSampler as MMBatchSampler

    mm_ds, ds = _train_sets(mm, coco_root)
    for batch_size in (2, 3):
        for rank in range(world_size):
            ref = MMBatchSampler(_mmengine_sampler(mm_ds, True, 5, rank, world_size), batch_size)
            ours_ = AspectRatioBatchSampler(DistributedSampler(len(ds), rank, world_size, seed=5),
                                            ds.portrait, batch_size)
            for epoch in range(3):
                ref.sampler.set_epoch(epoch)
                ours_.set_epoch(epoch)
                batches = [[k.index for k in b] for b in ours_]
                assert batches == list(ref)
                assert len(batches) == len(ours_) == len(ref)


def test_only_the_tail_batch_mixes_orientations(coco_root):
    ds = ours(coco_root, train=True)
    assert any(ds.portrait) and not all(ds.portrait)
    for seed in range(6):
        sampler = AspectRatioBatchSampler(DistributedSampler(len(ds), 0, 1, seed=seed), ds.portrait, 2)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            batches = list(sampler)
            mixed = [i for i, b in enumerate(batches) if len({ds.portrait[k.index] for k in b}) > 1]
            assert mixed in ([], [len(batches) - 1])
            assert sorted(k.index for b in batches for k in b) == list(range(len(ds)))
            assert all(k.epoch == epoch and k.batch == i for i, b in enumerate(batches) for k in b)


def test_order_is_deterministic_per_seed_and_epoch():
    portrait = [i % 3 == 0 for i in range(20)]

    def epoch_batches(seed, epoch):
        sampler = AspectRatioBatchSampler(DistributedSampler(20, 0, 1, seed=seed), portrait, 2)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert epoch_batches(1, 2) == epoch_batches(1, 2)
    assert epoch_batches(1, 2) != epoch_batches(1, 3)
    assert epoch_batches(1, 2) != epoch_batches(2, 2)


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_gives_the_remaining_order(world_size):
    portrait = [i % 4 == 1 for i in range(23)]
    for rank in range(world_size):
        full = AspectRatioBatchSampler(DistributedSampler(23, rank, world_size, seed=9), portrait, 2)
        full.set_epoch(3)
        expected = list(full)
        for done in (0, 1, 4, len(expected)):
            sampler = AspectRatioBatchSampler(DistributedSampler(23, rank, world_size, seed=9), portrait, 2)
            sampler.set_epoch(3)
            iterator = iter(sampler)
            consumed = [next(iterator) for _ in range(done)]
            state = resume_position(consumed[-1]) if consumed else {"epoch": 3, "batch": 0}
            assert consumed == expected[:done]
            assert sampler.state_dict()["batch"] == done and sampler.state_dict()["epoch"] == 3

            resumed = AspectRatioBatchSampler(DistributedSampler(23, rank, world_size, seed=9), portrait, 2)
            resumed.load_state_dict({**sampler.state_dict(), **state})
            assert list(resumed) == expected[done:]
            # A resume applies once; the next iteration replays the epoch.
            assert list(resumed) == expected


def test_index_sampler_resume_and_restart():
    sampler = DistributedSampler(10, 1, 2, seed=4)
    sampler.set_epoch(2)
    expected = list(sampler)
    iterator = iter(sampler)
    head = [next(iterator), next(iterator)]
    state = sampler.state_dict()
    assert state["index"] == 2 and state["epoch"] == 2 and head == expected[:2]
    assert list(sampler) == expected  # a new iteration starts the epoch again
    resumed = DistributedSampler(10, 1, 2, seed=4)
    resumed.load_state_dict(state)
    assert list(resumed) == expected[2:]
    with pytest.raises(ValueError, match="seed=4"):
        DistributedSampler(10, 1, 2, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        BatchSampler(DistributedSampler(10, 1, 2, seed=4), 3).load_state_dict(
            {**BatchSampler(sampler, 2).state_dict(), "batch": 1})


# ----------------------------------------------------------------------------- DataLoader


def _loader_batches(ds, num_workers, epoch, state=None):
    loader = build_dataloader(ds, num_workers=num_workers, seed=21)
    loader.batch_sampler.set_epoch(epoch)
    if state is not None:
        loader.batch_sampler.load_state_dict(state)
    return list(loader)


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["images"].numpy(), y["images"].numpy())
        for key in ("gt_bboxes", "gt_labels", "gt_bboxes_ignore", "gt_labels_ignore"):
            assert len(x[key]) == len(y[key])
            for p, q in zip(x[key], y[key]):
                np.testing.assert_array_equal(p.numpy(), q.numpy())
        for key in ("img_ids", "ori_shapes", "img_shapes", "pad_shapes", "scale_factors", "flips", "keys",
                    "batch_input_shape"):
            assert x[key] == y[key], key


def test_workers_give_the_same_batches_and_resume(coco_root):
    ds = ours(coco_root, train=True)
    serial = _loader_batches(ds, 0, epoch=1)
    assert sum(len(b["img_ids"]) for b in serial) == len(ds)
    assert all(b["images"].shape[2] % 32 == 0 and b["images"].shape[3] % 32 == 0 for b in serial)
    flips = [f for b in serial for f in b["flips"]]
    assert any(flips) and not all(flips)
    assert any(len(g) == 0 for b in serial for g in b["gt_bboxes"])  # the crowd-only image
    parallel = _loader_batches(ds, 2, epoch=1)
    _assert_batches_equal(serial, parallel)
    resumed = _loader_batches(ds, 2, epoch=1, state=resume_position(serial[1]["keys"]))
    _assert_batches_equal(serial[2:], resumed)


def test_test_loader_keeps_dataset_order(coco_root):
    ds = ours(coco_root, train=False)
    batches = list(build_dataloader(ds, num_workers=0))
    assert [b["img_ids"][0] for b in batches] == ds.img_ids
    assert all(not b["flips"][0] for b in batches)


# ----------------------------------------------------------------------------- tiny COCO


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_tiny_coco_is_deterministic(coco_root, tmp_path):
    again = tiny_coco.generate(tmp_path / "again", train=10, val=5, seed=0)
    assert _tree(again) == _tree(coco_root)
    other = tiny_coco.generate(tmp_path / "other", train=10, val=5, seed=1)
    assert _tree(other) != _tree(coco_root)
    # An image does not depend on how many follow it.
    fewer = tiny_coco.generate(tmp_path / "fewer", train=3, val=1, seed=0)
    assert (fewer / "train2017/000000000002.png").read_bytes() == \
        (coco_root / "train2017/000000000002.png").read_bytes()


def test_tiny_coco_content(coco_root):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    coco = COCO(str(coco_root / TRAIN_ANN))
    assert [c["id"] for c in coco.dataset["categories"]] == list(COCO_CATEGORY_IDS)
    anns = coco.dataset["annotations"]
    crowds = [a for a in anns if a["iscrowd"]]
    assert crowds
    for a in crowds:
        rle = mask_utils.frPyObjects(a["segmentation"], *a["segmentation"]["size"])
        assert mask_utils.area(rle) == a["area"]
        assert mask_utils.toBbox(rle).tolist() == a["bbox"]
    assert any(max(a["bbox"][2:]) < 32 for a in anns if not a["iscrowd"])
    sizes = [(img["width"], img["height"]) for img in coco.dataset["images"]]
    assert any(w < h for w, h in sizes) and any(w > h for w, h in sizes) and any(w == h for w, h in sizes)
    assert len({w / h for w, h in sizes}) > 5
    for img in coco.dataset["images"]:
        decoded = cv2.imread(str(coco_root / "train2017" / img["file_name"]))
        assert decoded.shape == (img["height"], img["width"], 3)
    for a in anns:
        if not a["iscrowd"]:
            xs, ys = a["segmentation"][0][0::2], a["segmentation"][0][1::2]
            x, y, w, h = a["bbox"]
            assert abs(min(xs) - x) <= 0.01 and abs(max(ys) - (y + h)) <= 0.02


def test_tiny_coco_cli_and_atomic_writes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli"
    assert tiny_coco.main([str(out), "--train", "2", "--val", "1", "--size", "128x96"]) == 0
    assert sorted(p.name for p in (out / "train2017").iterdir()) == ["000000000001.png", "000000000002.png"]
    assert tiny_coco.main([str(out), "--train", "2"]) == 2
    assert "exists" in capsys.readouterr().err
    assert tiny_coco.main([str(tmp_path / "x"), "--size", "300x20"]) == 2

    before = _tree(out)

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny_coco, "build_split", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny_coco.generate(out, train=2, val=1, overwrite=True)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny_coco.generate(tmp_path / "new", train=2, val=1)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]
