"""Data alignment: the same tiny COCO through mmdet's pipelines and ours.

The seeded tiny COCO (``paddle_impl.data.tiny_coco``, 8 train and 4 val images) is
generated into the build folder. Its training split goes through mmdet's
``CocoDataset`` with the config's train pipeline and ``DetDataPreprocessor``
(training mode) twice, with ``RandomFlip`` forced on (prob 1.0) and off (prob
0.0), and through our ``CocoDetection`` + ``Collate`` with ``flip=True`` /
``False``; the val split goes through both test pipelines. Batches are taken
in dataset order, ``batch_size`` images each.

Compared: the filtered image list (ids, in order); per batch the network
input ``(B, 3, H, W)`` (absolute tolerance, default 1e-6) and
``batch_input_shape``; per image ``img_shape``, ``pad_shape``,
``scale_factor``, ``flip``, the boxes and labels of the kept and of the
ignored (crowd) instances, all exactly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from align.engine.cli import progress
from align.engine.compare import TensorDiff, first_failed_name
from align.engine.reprod import reprod_log_diff
from align.engine.report import Headline, StageResult
from align.engine.rows import abs_row, absent_row, exact_row
from align.engine.options import option, seed_option
from align.ghm.pair import GhmStageOptions
from common.arguments import format_size, non_negative_float, parse_size, positive
from align.ghm.pipelines import (mmdet_batch, mmdet_dataset, mmdet_preprocessor, mmdet_setup,
                                  our_dataset, tiny_coco_root)
from align.ghm.suite import write_report
from paddle_impl.config import get_config

DEFAULT_SCALE = tuple(get_config()["data"]["scale"])


class ImageRow(NamedTuple):
    """One image of one pass, as the report's table shows it."""

    pass_name: str
    batch: int
    img_id: int
    img_shape: str
    pad_shape: str
    flip_mmdet: bool
    flip_paddle: bool
    boxes: int
    ignored: int


@dataclass
class DataOptions(GhmStageOptions):
    ckpt: str | None = option(None, "accepted for a uniform command line; the data stage uses no weights")
    seed: int = seed_option("seed of the tiny COCO (default %(default)s)")
    scale: tuple[int, int] = option(DEFAULT_SCALE, f"Resize bound WxH (mmdet's scale=(w, h)) for both pipelines "
                                                   f"(default {format_size(DEFAULT_SCALE)}, the config's)",
                                    type=parse_size)
    batch_size: int = option(2, "images per batch (default %(default)s)", type=positive)
    input_atol: float = option(1e-6, "bound on the input tensors' max |diff| (default %(default)s)",
                               type=non_negative_float)
    # Deliberate error for testing the stage: our side flips the opposite way
    # to mmdet in the flip-forced passes.
    inject_flip_mismatch: bool = option(False, "deliberate error: Paddle flips the opposite way to mmdet "
                                               "(the stage must fail)")


def _mmdet_side(preprocessor, dataset, indices, training: bool) -> dict:
    """mmdet's packed samples of ``indices`` through its data preprocessor, as numpy."""
    out = preprocessor(mmdet_batch([dataset[i] for i in indices]), training=training)
    samples = out["data_samples"]
    return {
        "inputs": out["inputs"].numpy(),
        "batch_input_shape": np.array(samples[0].batch_input_shape, np.int64),
        "images": [{
            "img_id": int(s.img_id),
            "img_shape": np.array(s.img_shape, np.int64),
            "pad_shape": np.array(s.pad_shape, np.int64),
            "scale_factor": np.array(s.scale_factor, np.float64),
            "flip": np.array(bool(s.get("flip", False))),
            "gt_bboxes": s.gt_instances.bboxes.numpy().reshape(-1, 4),
            "gt_labels": s.gt_instances.labels.numpy(),
            "ignored_bboxes": s.ignored_instances.bboxes.numpy().reshape(-1, 4),
            "ignored_labels": s.ignored_instances.labels.numpy(),
        } for s in samples],
    }


def _our_side(collate, dataset, indices) -> dict:
    """Our samples of ``indices`` collated into the model's batch, as numpy."""
    batch = collate.batch([dataset[i] for i in indices])
    return {
        "inputs": batch["images"].numpy(),
        "batch_input_shape": np.array(batch["batch_input_shape"], np.int64),
        "images": [{
            "img_id": int(batch["img_ids"][i]),
            "img_shape": np.array(batch["img_shapes"][i], np.int64),
            "pad_shape": np.array(batch["pad_shapes"][i], np.int64),
            "scale_factor": np.array(batch["scale_factors"][i], np.float64),
            "flip": np.array(bool(batch["flips"][i])),
            "gt_bboxes": batch["gt_bboxes"][i].numpy().reshape(-1, 4),
            "gt_labels": batch["gt_labels"][i].numpy(),
            "ignored_bboxes": batch["gt_bboxes_ignore"][i].numpy().reshape(-1, 4),
            "ignored_labels": batch["gt_labels_ignore"][i].numpy(),
        } for i in range(len(indices))],
    }


IMAGE_KEYS = ("img_shape", "pad_shape", "scale_factor", "flip", "gt_bboxes", "gt_labels",
              "ignored_bboxes", "ignored_labels")


def compare_pass(name: str, mm_ds, our_ds, preprocessor, collate, training: bool, opts: DataOptions,
                 torch_out: dict, paddle_out: dict) -> tuple[list[TensorDiff], list[ImageRow]]:
    """Rows of one pass over a dataset (``name`` prefixes every key); fills the reprod_log dicts."""
    rows: list[TensorDiff] = []
    table: list[ImageRow] = []
    mm_ids = np.array([mm_ds.get_data_info(i)["img_id"] for i in range(len(mm_ds))], np.int64)
    our_ids = np.array(our_ds.img_ids, np.int64)
    rows.append(exact_row(f"{name}.img_ids", mm_ids, our_ids))
    torch_out[f"{name}.img_ids"], paddle_out[f"{name}.img_ids"] = mm_ids, our_ids
    if len(mm_ids) != len(our_ids):
        return rows, table
    for b, begin in enumerate(range(0, len(mm_ds), opts.batch_size)):
        indices = list(range(begin, min(begin + opts.batch_size, len(mm_ds))))
        ref = _mmdet_side(preprocessor, mm_ds, indices, training)
        got = _our_side(collate, our_ds, indices)
        key = f"{name}.batch{b}"
        rows.append(abs_row(f"{key}.inputs", ref["inputs"], got["inputs"], opts.input_atol))
        rows.append(exact_row(f"{key}.batch_input_shape", ref["batch_input_shape"], got["batch_input_shape"]))
        for side, out in (("ref", torch_out), ("got", paddle_out)):
            data = ref if side == "ref" else got
            out[f"{key}.inputs"] = data["inputs"]
            out[f"{key}.batch_input_shape"] = data["batch_input_shape"]
        for r_img, g_img in zip(ref["images"], got["images"]):
            img_key = f"{key}.img{r_img['img_id']}"
            if r_img["img_id"] != g_img["img_id"]:
                rows.append(absent_row(f"{img_key} (paddle has image {g_img['img_id']})", "paddle"))
                continue
            for field in IMAGE_KEYS:
                rows.append(exact_row(f"{img_key}.{field}", r_img[field], g_img[field]))
                torch_out[f"{img_key}.{field}"] = r_img[field]
                paddle_out[f"{img_key}.{field}"] = g_img[field]
            table.append(ImageRow(name, b, r_img["img_id"], str(tuple(r_img["img_shape"].tolist())),
                                  str(tuple(r_img["pad_shape"].tolist())), bool(r_img["flip"]), bool(g_img["flip"]),
                                  len(r_img["gt_labels"]), len(r_img["ignored_labels"])))
    return rows, table


def run_data(opts: DataOptions) -> StageResult:
    """Run both data sides, diff, write ``data*`` files into ``opts.reports``."""
    from paddle_impl.data.transforms import Collate

    if opts.batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {opts.batch_size}")
    root = tiny_coco_root(opts.build_dir, opts.seed)
    cfg = mmdet_setup()
    preprocessor = mmdet_preprocessor(cfg)
    collate = Collate()

    t0 = time.perf_counter()
    rows: list[TensorDiff] = []
    table: list[ImageRow] = []
    torch_out: dict[str, np.ndarray] = {}
    paddle_out: dict[str, np.ndarray] = {}
    # Training with the flip forced on, then off, then the test pipeline.
    for flip in progress((True, False, None), "data"):
        train = flip is not None
        mm_ds = mmdet_dataset(cfg, root, train=train, scale=opts.scale, flip_prob=1.0 if flip else 0.0)
        if train:
            ours_flip = (not flip) if opts.inject_flip_mismatch else flip
            our_ds = our_dataset(root, train=True, scale=opts.scale, flip=ours_flip, seed=opts.seed)
        else:
            our_ds = our_dataset(root, train=False, scale=opts.scale)
        name = f"train.flip_{'on' if flip else 'off'}" if train else "test"
        r, t = compare_pass(name, mm_ds, our_ds, preprocessor, collate, train, opts, torch_out, paddle_out)
        rows += r
        table += t
    seconds = time.perf_counter() - t0

    reprod = reprod_log_diff(paddle_out, torch_out, opts.reports, "data", opts.input_atol)
    inputs = [row for row in rows if row.name.endswith(".inputs")]
    meta = {
        "seed": opts.seed,
        "tiny_coco": str(root),
        "resize_scale": list(opts.scale),
        "batch_size": opts.batch_size,
        "train_images_kept": paddle_out["train.flip_on.img_ids"].tolist(),
        "test_images": paddle_out["test.img_ids"].tolist(),
        "worst_input_abs_diff": max((row.max_abs for row in inputs), default=float("nan")),
        "flip_mismatch_injected": opts.inject_flip_mismatch,
        "seconds": round(seconds, 2),
    }
    return write_report(StageResult(
        stage="data",
        title="Data: tiny COCO through mmdet's pipelines and preprocessor vs Paddle's",
        passed=all(row.passed for row in rows),
        tensors=rows,
        thresholds={"network input (abs)": opts.input_atol,
                    "image lists, shapes, scale factors, flips, boxes, labels": "exact"},
        meta=meta,
        extra_tables=[("Images per pass and batch",
                       ["pass", "batch", "img_id", "img_shape", "pad_shape", "flip mmdet", "flip paddle",
                        "boxes", "ignored"], table)],
        reprod_log=reprod,
        reprod_log_threshold=opts.input_atol,
        reprod_log_check=opts.input_atol,
        headline=Headline.largest_abs(rows, opts.input_atol,
                                      "largest |diff| (network inputs within the bound, the rest exact)"),
    ), opts.reports)


def first_divergence(result: StageResult) -> str | None:
    return first_failed_name(result.tensors)
