"""COCO detection data as mmdet 3.3.0's ``CocoDataset`` reads it, and its DataLoader.

What an image contributes (mmdet's ``CocoDataset.parse_data_info``), per
annotation in file order:

- skipped when ``ignore`` is true, when the box ``[x, y, w, h]`` does not
  overlap the image (``[0, width] x [0, height]`` from the annotation file),
  when ``area <= 0`` or ``w < 1`` or ``h < 1``, or when its category is not one
  of the 80 COCO classes;
- otherwise kept as ``[x, y, x + w, y + h]`` (not clipped here: the resize
  clips), with ``iscrowd`` marking it ignored.

Labels: the file's categories whose names are COCO classes, numbered 0, 1, ...
in the order the file lists them (``COCO.getCatIds(catNms=...)`` keeps file
order).

Which images a training set keeps (``CocoDataset.filter_data`` with
``filter_empty_gt`` and ``min_size``): an image is dropped when none of its raw
annotations has a COCO-class category - crowd, ``ignore`` and degenerate
annotations count, since mmdet looks at pycocotools' ``catToImgs`` - or when
``min(width, height) < min_size``. A test set keeps every image.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import paddle
from pycocotools.coco import COCO

from paddle_impl.data.coco_classes import COCO_CLASSES
from paddle_impl.config import get_config
from common.errors import one_line
from paddle_impl.errors import DataError
from paddle_impl.data.samplers import AspectRatioBatchSampler, BatchSampler, DistributedSampler, SampleKey
from paddle_impl.data.transforms import Collate, load_image, test_pipeline, train_pipeline, unpack_batch


@dataclass(frozen=True)
class ImageRecord:
    """One image of the annotation file with its parsed instances.

    ``boxes`` ``(N, 4)`` float32 ``(x1, y1, x2, y2)``, ``labels`` ``(N,)`` int64,
    ``ignore`` ``(N,)`` bool (crowd), in annotation-file order.
    """

    img_id: int
    path: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _with_unique_ids(ann_file: str, entries: list, kind: str,
                     where: Callable[[dict], str]) -> Iterator[tuple[dict, str]]:
    """Each entry of one of the file's lists, with the place messages name it by.

    An entry is checked before it is yielded: a dict whose ``'id'`` is an
    integer no earlier entry of the list has. ``kind`` names the list's
    entries in messages, ``where(entry)`` the entry itself.
    """
    seen = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not _is_int(entry.get("id")):
            raise ValueError(f"{ann_file}: {kind} #{i} has no integer 'id': {entry!r}")
        place = where(entry)
        if entry["id"] in seen:
            raise ValueError(f"{place} appears twice")
        seen.add(entry["id"])
        yield entry, place


def read_annotation_file(ann_file: str) -> dict[str, Any]:
    """Load a COCO instances json and check its structure.

    Raises ``FileNotFoundError`` or ``ValueError`` naming the file and the
    offending image or annotation id. Out-of-image or degenerate boxes are not
    errors (they are skipped as mmdet skips them); missing or mistyped fields,
    duplicate ids, annotations of unknown images and an empty category list are.
    """
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    try:
        with open(ann_file, "rb") as f:
            data = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{ann_file}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{ann_file}: expected a JSON object with 'images', 'annotations' "
                         f"and 'categories', found {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{ann_file}: '{key}' must be a list")
    data.setdefault("annotations", [])
    if not isinstance(data["annotations"], list):
        raise ValueError(f"{ann_file}: 'annotations' must be a list")
    if not data["categories"]:
        raise ValueError(f"{ann_file}: the category list is empty")

    category_ids = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise ValueError(f"{ann_file}: category #{i} needs an integer 'id' and a string 'name': {cat!r}")
        if cat["id"] in category_ids:
            raise ValueError(f"{ann_file}: category id {cat['id']} appears twice")
        category_ids.add(cat["id"])

    images = _with_unique_ids(ann_file, data["images"], "image",
                              lambda img: f"{ann_file}: image id {img['id']}")
    for img, where in images:
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise ValueError(f"{where}: needs a non-empty string 'file_name'")
        for key in ("width", "height"):
            if not _is_int(img.get(key)) or img[key] <= 0:
                raise ValueError(f"{where}: '{key}' must be a positive integer, found {img.get(key)!r}")

    image_ids = {img["id"] for img in data["images"]}
    annotations = _with_unique_ids(
        ann_file, data["annotations"], "annotation",
        lambda ann: f"{ann_file}: annotation id {ann['id']} (image id {ann.get('image_id')!r})")
    for ann, where in annotations:
        if ann.get("image_id") not in image_ids:
            raise ValueError(f"{where}: refers to an image that is not in 'images'")
        if ann.get("category_id") not in category_ids:
            raise ValueError(f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise ValueError(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], found {bbox!r}")
        if not _is_number(ann.get("area")):
            raise ValueError(f"{where}: 'area' must be a finite number, found {ann.get('area')!r}")
    return data


def _index(data: dict[str, Any]) -> COCO:
    """pycocotools' index over already-checked json (its progress prints are dropped)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def parse_image(coco: COCO, img_id: int, cat2label: dict[int, int], img_prefix: str) -> ImageRecord:
    """The instances of one image, kept and labelled as mmdet's ``parse_data_info``."""
    info = coco.imgs[img_id]
    width, height = info["width"], info["height"]
    boxes, labels, ignore = [], [], []
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img_id])):
        if ann.get("ignore", False):
            continue
        x, y, w, h = ann["bbox"]
        overlap_w = max(0, min(x + w, width) - max(x, 0))
        overlap_h = max(0, min(y + h, height) - max(y, 0))
        if overlap_w * overlap_h == 0:
            continue
        if ann["area"] <= 0 or w < 1 or h < 1:
            continue
        if ann["category_id"] not in cat2label:
            continue
        # x + w in Python floats, then one rounding to float32, as mmdet builds its boxes.
        boxes.append([x, y, x + w, y + h])
        labels.append(cat2label[ann["category_id"]])
        ignore.append(bool(ann.get("iscrowd", False)))
    return ImageRecord(
        img_id=img_id,
        path=os.path.join(img_prefix, info["file_name"]),
        width=width,
        height=height,
        boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.array(labels, dtype=np.int64),
        ignore=np.array(ignore, dtype=bool),
    )


class CocoDetection(paddle.io.Dataset):
    """A COCO instances file and its images, through mmdet's train or test pipeline.

    Args:
        ann_file: COCO instances json.
        img_prefix: folder the images' ``file_name`` are relative to.
        train: training set (filtered; resize, random flip) or test set
            (every image; resize; boxes in original pixels).
        flip: ``None`` draws the flip of each sample (training only), ``True``
            or ``False`` forces it for every sample (for alignment).
        seed: seeds the flip draws: the draw for dataset index ``i`` in epoch
            ``e`` (from its :class:`SampleKey`) is
            ``default_rng([seed, e, i]).random() < flip_prob``.
        scale, flip_prob, filter_empty_gt, min_size: default from
            ``get_config()['data']`` (``test_scale`` for a test set).

    ``dataset[key]`` with a :class:`SampleKey` or a plain index (epoch 0) gives
    a dict: ``img`` ``(3, h, w)`` uint8 BGR; ``gt_bboxes`` ``(G, 4)`` float32,
    ``gt_labels`` ``(G,)`` int64; ``gt_bboxes_ignore`` ``(I, 4)``,
    ``gt_labels_ignore`` ``(I,)`` (crowd); ``img_id``, ``img_path``,
    ``ori_shape`` and ``img_shape`` ``(h, w)``, ``scale_factor``
    ``(w_scale, h_scale)``, ``flip``, ``flip_direction``, ``key``
    ``(index, epoch, batch)``.

    mmdet draws its flips from each worker's global numpy generator, so its
    flips depend on worker count and scheduling; here they depend only on
    ``(seed, epoch, index)``, hence are the same for any ``num_workers`` and
    after a resume.
    """

    def __init__(self, ann_file: str, img_prefix: str, train: bool, *, flip: bool | None = None,
                 seed: int = 0, scale: Sequence[int] | None = None, flip_prob: float | None = None,
                 filter_empty_gt: bool | None = None, min_size: int | None = None) -> None:
        super().__init__()
        if not train and flip:
            raise ValueError("a test set does not flip (mmdet's test pipeline has no RandomFlip); "
                             "use flip=None or False")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        cfg = get_config()["data"]
        self.ann_file = str(ann_file)
        self.img_prefix = str(img_prefix)
        self.train = train
        self.flip = flip
        self.seed = seed
        self.scale = tuple(scale if scale is not None else cfg["scale"] if train else cfg["test_scale"])
        self.flip_prob = cfg["flip_prob"] if flip_prob is None else flip_prob
        self.filter_empty_gt = cfg["filter_empty_gt"] if filter_empty_gt is None else filter_empty_gt
        self.min_size = cfg["min_size"] if min_size is None else min_size

        coco = _index(read_annotation_file(self.ann_file))
        self.cat_ids = coco.getCatIds(catNms=list(COCO_CLASSES))
        if not self.cat_ids:
            raise ValueError(f"{self.ann_file}: none of its categories is named as a COCO class "
                             f"(e.g. {COCO_CLASSES[:3]})")
        self.cat2label = {cat_id: label for label, cat_id in enumerate(self.cat_ids)}
        records = [parse_image(coco, img_id, self.cat2label, self.img_prefix) for img_id in coco.getImgIds()]
        if train:
            records = self._filter(records, coco)
        if not records:
            raise ValueError(f"{self.ann_file}: no images left "
                             f"(filter_empty_gt={self.filter_empty_gt}, min_size={self.min_size})")
        self.records = records

    def _filter(self, records: list[ImageRecord], coco: COCO) -> list[ImageRecord]:
        """Training filter of mmdet's ``CocoDataset.filter_data``."""
        with_class = set()
        for cat_id in self.cat_ids:
            with_class.update(coco.catToImgs[cat_id])
        return [r for r in records
                if (not self.filter_empty_gt or r.img_id in with_class)
                and min(r.width, r.height) >= self.min_size]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def img_ids(self) -> list[int]:
        """Image ids in dataset order."""
        return [r.img_id for r in self.records]

    @property
    def portrait(self) -> list[bool]:
        """Per image, ``width < height`` by the annotation file (mmdet's grouping rule)."""
        return [r.width < r.height for r in self.records]

    def draws_flip(self, key: SampleKey) -> bool:
        """Whether the sample ``key`` is mirrored."""
        if self.flip is not None:
            return self.flip
        if not self.train:
            return False
        return bool(np.random.default_rng([self.seed, key.epoch, key.index]).random() < self.flip_prob)

    def __getitem__(self, key: int | SampleKey | Sequence[int]) -> dict[str, Any]:
        key = SampleKey(key) if isinstance(key, numbers.Integral) else SampleKey(*key)
        if not 0 <= key.index < len(self.records):
            raise IndexError(f"index {key.index} outside a dataset of {len(self.records)} images")
        record = self.records[key.index]
        img = load_image(record.path, record.img_id)
        if self.train:
            sample = train_pipeline(img, record.boxes, record.labels, record.ignore, self.scale,
                                    flip=self.draws_flip(key))
        else:
            sample = test_pipeline(img, record.boxes, record.labels, record.ignore, self.scale)
        sample.update(img_id=record.img_id, img_path=record.path, key=tuple(key))
        return sample


def check_image_files(*datasets: CocoDetection, limit: int = 10) -> None:
    """Raise :class:`DataError` listing (up to ``limit``) the image files of ``datasets``
    that do not exist, with their image ids; one ``stat`` per file."""
    missing = [(d, r) for d in datasets for r in d.records if not os.path.isfile(r.path)]
    if not missing:
        return
    shown = ", ".join(f"{r.path} (image id {r.img_id})" for _, r in missing[:limit])
    more = f" and {len(missing) - limit} more" if len(missing) > limit else ""
    files = sorted({d.ann_file for d, _ in missing})
    raise DataError(f"{len(missing)} image file(s) listed in {', '.join(files)} not found: {shown}{more}")


# Batches each DataLoader worker (or, without workers, the reading thread) prepares ahead of training.
PREFETCH_FACTOR = 2

# The key a sample or a batch carries instead of its data when it could not be made.
_FAULT = "fault"


class _FaultTolerantDataset(paddle.io.Dataset):
    """``dataset[key]``, or ``{'fault': message}`` when the sample cannot be made.

    An exception inside a DataLoader worker reaches the training process as
    Paddle's own queue error, and with no workers it can leave the loader
    waiting forever; passing the fault along as data lets the training process
    raise it itself, naming the file.
    """

    def __init__(self, dataset: CocoDetection) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> dict[str, Any]:
        try:
            return self.dataset[key]
        except Exception as err:  # noqa: BLE001 - every fault is reported, named, by the main process
            message = one_line(err)
            if isinstance(err, (OSError, ValueError)) and "image id" in message:
                return {_FAULT: message}  # load_image's own message names the file and id
            record = self.dataset.records[SampleKey(*key).index if not isinstance(key, numbers.Integral)
                                          else key]
            return {_FAULT: f"{record.path} (image id {record.img_id}): {type(err).__name__}: {message}"}


class _FaultTolerantCollate:
    """:class:`Collate`, or ``{'fault': message}`` when a sample of the batch carries one.

    The message travels as a uint8 array: a batch without any array reaches
    the reading process as an empty one, which Paddle's loader takes for the
    end of the data (and then waits for its reading thread forever).
    """

    def __init__(self, collate: Collate) -> None:
        self.collate = collate

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        faults = [s[_FAULT] for s in samples if _FAULT in s]
        if not faults:
            try:
                return self.collate(samples)
            except Exception as err:  # noqa: BLE001
                paths = ", ".join(s.get("img_path", "?") for s in samples)
                faults = [f"batch of {paths}: {type(err).__name__}: {one_line(err)}"]
        return {_FAULT: np.frombuffer(faults[0].encode("utf-8"), np.uint8).copy()}


class DetDataLoader:
    """A ``paddle.io.DataLoader`` over a :class:`CocoDetection` that yields model batches.

    Workers run the pipeline and :class:`Collate`; the main process applies
    :func:`~paddle_impl.data.transforms.unpack_batch`, so each batch is the dict it
    documents (``images``, per-image ``gt_bboxes`` and ``gt_labels``,
    ``pad_shapes``, ...). ``batch_sampler`` drives epochs and resumption.
    An image that cannot be read or decoded raises :class:`DataError` naming
    the file and the image id in the iterating process, with any number of
    workers.

    Loading overlaps training: while a batch is being trained on, each worker
    has ``PREFETCH_FACTOR`` batches requested ahead (without workers, the
    loader's reading thread keeps as many ready), and finished batches move
    into the loader's queue in the background (``use_buffer_reader``). Which
    batches come, and in which order, is the batch sampler's alone.
    """

    def __init__(self, dataset: CocoDetection, batch_sampler: BatchSampler, num_workers: int,
                 collate: Collate) -> None:
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.loader = paddle.io.DataLoader(_FaultTolerantDataset(dataset), batch_sampler=batch_sampler,
                                           num_workers=num_workers,
                                           collate_fn=_FaultTolerantCollate(collate),
                                           use_buffer_reader=True, prefetch_factor=PREFETCH_FACTOR)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for packed in self.loader:
            if _FAULT in packed:
                message = np.asarray(packed[_FAULT], dtype=np.uint8).tobytes().decode("utf-8", "replace")
                raise DataError(message)
            yield unpack_batch(packed)


def build_dataloader(dataset: CocoDetection, *, batch_size: int | None = None,
                     num_workers: int | None = None, seed: int = 0, rank: int | None = None,
                     world_size: int | None = None, collate: Collate | None = None) -> DetDataLoader:
    """The loader mmdet's config builds for ``dataset``, over this rank's share.

    Training: shuffled :class:`DistributedSampler` (``seed`` as the run's seed)
    under an :class:`AspectRatioBatchSampler`. Test: dataset order, plain
    batches, no padding: the ranks' loaders together yield every image exactly
    once (a rank's may yield none). ``batch_size`` and ``num_workers`` default from
    ``get_config()['data']`` (``batch_size_per_device`` / ``test_batch_size``).
    Drive epochs with ``loader.batch_sampler.set_epoch(e)``; resume with
    ``loader.batch_sampler.load_state_dict(resume_position(batch['keys']))``.
    """
    cfg = get_config()["data"]
    if batch_size is None:
        batch_size = cfg["batch_size_per_device"] if dataset.train else cfg["test_batch_size"]
    num_workers = cfg["num_workers"] if num_workers is None else num_workers
    sampler = DistributedSampler(len(dataset), rank=rank, world_size=world_size,
                                 shuffle=dataset.train, seed=seed, round_up=dataset.train)
    if dataset.train:
        batch_sampler = AspectRatioBatchSampler(sampler, dataset.portrait, batch_size)
    else:
        batch_sampler = BatchSampler(sampler, batch_size)
    return DetDataLoader(dataset, batch_sampler, num_workers, collate if collate is not None else Collate())
