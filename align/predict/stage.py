"""Prediction alignment: mmdet's ``model.predict`` vs ours on the tiny COCO's val images.

Each side runs its own test pipeline (Resize keep-ratio, no flip) and data
preprocessor on every val image of the seeded tiny COCO, one image per batch
as mmdet's val loader does; mmdet then calls ``RetinaNet.predict(...,
rescale=True)`` and we call ``paddle_impl.boxes.postprocess.predict``. Both use the
same test configuration. Compared per image: the number of detections
(exactly), the labels (exactly), the boxes in original pixels (absolute,
default 1e-3 px) and the scores (absolute, default 1e-5).

Pairing. Both sides list detections by descending score. Two detections
whose scores differ by less than the frameworks' rounding (~1e-7) can come
out in either order, which says nothing about the post-processing. So each
mmdet detection, in order, is paired with the first unpaired Paddle detection
of the same label whose score and box are within the tolerances; the Paddle
arrays are compared in that paired order (unpaired ones fill the remaining
positions in their own order, and fail). How many pairs are not at the same
position is reported as ``reordered``.

Which weights. The seeded default checkpoint is a freshly initialised
detector: its classifier's prior makes every score about 0.01, below the
reference ``score_thr`` 0.05, so the reference test_cfg gives no detection on
either side, which checks little. The stage therefore runs two checkpoints
with the reference test_cfg:

- ``as_given``: the checkpoint itself (a user's ``--ckpt``, or the default);
- ``sharpened`` (default checkpoint only): the same weights with the final
  classification conv ``retina_cls`` rescaled so that its logits on a seeded
  320x480 image have mean -6 and standard deviation 1.5 (``w' = k w``,
  ``b' = k (b - mean) + (-6)``, ``k = 1.5 / std``). Scores then spread over
  (0, 1), hundreds of candidates pass 0.05 per level, and the ``nms_pre``,
  NMS and ``max_per_img`` steps all act. Lowering ``score_thr`` to 0 on the
  plain checkpoint instead would leave millions of candidates within a few
  float32 ulps of 0.01, where the order of near-equal scores (which differ by
  the frameworks' ~1e-7 rounding) decides the cuts: a comparison of rounding
  noise, not of the post-processing.

``--score-thr`` overrides the threshold for both sides in every run.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from common.atomic_write import atomic_write
from align.engine.cli import progress
from align.engine.compare import TensorDiff, first_failed_name
from align.engine.reprod import reprod_log_diff
from align.engine.report import Headline, StageResult
from align.engine.rows import abs_row, exact_row
from align.engine.options import option
from align.ghm.pair import (Checkpoints, GhmStageOptions, build_paddle_model, build_torch_model,
                            prepare_checkpoints, seeded_images)
from common.arguments import format_size, fraction, non_negative_float, parse_size
from align.ghm.pipelines import (mmdet_batch, mmdet_dataset, mmdet_setup, our_dataset,
                                  tiny_coco_root)
from align.ghm.suite import write_report
from paddle_impl.config import get_config

DEFAULT_SCALE = tuple(get_config()["data"]["test_scale"])
SHARPEN_MEAN = -6.0
SHARPEN_STD = 1.5
CALIBRATION_SHAPE = (1, 3, 320, 480)


# The stage's default bounds on paired detections: boxes in pixels, scores absolute.
BOX_ATOL, SCORE_ATOL = 1e-3, 1e-5


@dataclass
class PredictOptions(GhmStageOptions):
    ckpt: str | None = option(None, "mmdet checkpoint (default: the seeded synthetic one, plus its sharpened "
                                    "variant)")
    scale: tuple[int, int] = option(DEFAULT_SCALE, f"test Resize bound WxH (mmdet's scale=(w, h)) for both "
                                                   f"pipelines (default {format_size(DEFAULT_SCALE)}, the config's)",
                                    type=parse_size)
    score_thr: float | None = option(None, "override test_cfg.score_thr on both sides", type=fraction)
    box_atol: float = option(BOX_ATOL, "bound on the boxes' |diff|, pixels (default %(default)s)",
                             type=non_negative_float)
    score_atol: float = option(SCORE_ATOL, "bound on the scores' |diff| (default %(default)s)",
                               type=non_negative_float)


def sharpened_checkpoint(ckpts: Checkpoints, seed: int, build_dir: Path) -> Path:
    """The checkpoint with ``retina_cls`` rescaled (see the module docstring), written once.

    Its name carries the source checkpoint's sha256, so a changed source gives
    a new file; it is written under a temporary name and renamed into place.
    """
    import torch

    from torch_ref.reference import load_mmdet_state_dict

    out = Path(build_dir) / "default" / f"{ckpts.torch_path.stem}-sharpened-{ckpts.sha256[:12]}.pth"
    if out.is_file():
        return out
    model = build_torch_model(ckpts)
    with torch.no_grad():
        feats = model.extract_feat(torch.from_numpy(seeded_images(CALIBRATION_SHAPE, seed)))
        cls_scores, _ = model.bbox_head(feats)
    logits = torch.cat([c.flatten() for c in cls_scores]).double()
    mean, std = float(logits.mean()), float(logits.std())
    k = SHARPEN_STD / std
    state = load_mmdet_state_dict(ckpts.torch_path)
    state["bbox_head.retina_cls.weight"] = (state["bbox_head.retina_cls.weight"].double() * k).float()
    state["bbox_head.retina_cls.bias"] = (
        (state["bbox_head.retina_cls.bias"].double() - mean) * k + SHARPEN_MEAN).float()
    checkpoint = {"meta": {"origin": f"{ckpts.torch_path.name} with retina_cls rescaled by {k:.6g} "
                                     f"(logit mean {mean:.6g} -> {SHARPEN_MEAN}, std {std:.6g} -> {SHARPEN_STD})"},
                  "state_dict": OrderedDict(state)}
    atomic_write(out, lambda tmp: torch.save(checkpoint, tmp))
    return out


def mmdet_predictions(model, dataset, score_thr: float | None) -> list[dict[str, np.ndarray]]:
    """mmdet's detections per image: its test pipeline, data preprocessor and ``predict``."""
    import torch
    from mmengine.config import ConfigDict

    original = model.bbox_head.test_cfg
    test_cfg = ConfigDict(original.to_dict() if hasattr(original, "to_dict") else dict(original))
    if score_thr is not None:
        test_cfg.score_thr = score_thr
    model.bbox_head.test_cfg = test_cfg
    out = []
    try:
        with torch.no_grad():
            for i in range(len(dataset)):
                data = model.data_preprocessor(mmdet_batch([dataset[i]]), False)
                pred = model.predict(data["inputs"], data["data_samples"], rescale=True)[0].pred_instances
                out.append({"img_id": int(dataset.get_data_info(i)["img_id"]),
                            "bboxes": pred.bboxes.numpy().reshape(-1, 4),
                            "scores": pred.scores.numpy(),
                            "labels": pred.labels.numpy().astype(np.int64)})
    finally:
        model.bbox_head.test_cfg = original
    return out


def paddle_predictions(model, dataset, score_thr: float | None) -> list[dict[str, np.ndarray]]:
    """Our detections per image: our test pipeline, ``Collate`` and ``RetinaNet.predict``."""
    from paddle_impl.data.transforms import Collate

    cfg = get_config()["test_cfg"]
    if score_thr is not None:
        cfg["score_thr"] = score_thr
    collate = Collate()
    out = []
    for i in range(len(dataset)):
        batch = collate.batch([dataset[i]])
        metas = [dict(img_shape=batch["img_shapes"][0], scale_factor=batch["scale_factors"][0])]
        det = model.predict(batch["images"], metas, cfg=cfg)[0]
        out.append({"img_id": int(batch["img_ids"][0]),
                    "bboxes": det.bboxes.numpy().reshape(-1, 4),
                    "scores": det.scores.numpy(),
                    "labels": det.labels.numpy().astype(np.int64)})
    return out


def pair_order(ref: dict, got: dict, box_atol: float, score_atol: float) -> tuple[np.ndarray, int]:
    """Indices into ``got`` in the order of their mmdet partners (see the module docstring),
    and how many paired detections sit at a different position. Needs equal counts."""
    n = len(ref["scores"])
    used = np.zeros(n, bool)
    order = np.full(n, -1, np.int64)
    for i in range(n):
        close = (~used & (got["labels"] == ref["labels"][i])
                 & (np.abs(got["scores"] - ref["scores"][i]) <= score_atol)
                 & (np.abs(got["bboxes"] - ref["bboxes"][i]).max(axis=1) <= box_atol))
        candidates = np.flatnonzero(close)
        if candidates.size:
            order[i] = candidates[np.argmin(np.abs(candidates - i))]
            used[order[i]] = True
    paired = order >= 0
    reordered = int((order[paired] != np.arange(n)[paired]).sum())
    order[~paired] = np.flatnonzero(~used)
    return order, reordered


def same_detections(ref: dict, got: dict, box_atol: float = BOX_ATOL, score_atol: float = SCORE_ATOL) -> bool:
    """One image's detections (``labels``, ``bboxes`` (n, 4), ``scores``) equal within the bounds:
    the same count and, paired by `pair_order`, the same labels, boxes and scores."""
    if len(ref["scores"]) != len(got["scores"]):
        return False
    order, _ = pair_order(ref, got, box_atol, score_atol)
    return bool(np.array_equal(np.asarray(got["labels"])[order], ref["labels"])
                and np.abs(np.asarray(got["bboxes"])[order] - ref["bboxes"]).max(initial=0) <= box_atol
                and np.abs(np.asarray(got["scores"])[order] - ref["scores"]).max(initial=0) <= score_atol)


class ImageRow(NamedTuple):
    """One image of one run, as the report's detection table shows it."""

    run: str
    image: int
    detections_mmdet: int
    detections_paddle: int
    top_score_mmdet: float
    lowest_score_mmdet: float
    max_box_diff_px: float
    max_score_diff: float
    reordered: int


def compare_run(name: str, ref: list[dict], got: list[dict], opts: PredictOptions,
                torch_out: dict, paddle_out: dict) -> tuple[list[TensorDiff], list[ImageRow]]:
    """Rows of one run: per image count, labels, boxes, scores."""
    rows, table = [], []
    for r, g in zip(ref, got):
        key = f"{name}.img{r['img_id']}"
        n_ref, n_got = len(r["scores"]), len(g["scores"])
        rows.append(exact_row(f"{key}.num_dets", np.int64(n_ref), np.int64(n_got)))
        reordered = 0
        if n_ref == n_got:
            order, reordered = pair_order(r, g, opts.box_atol, opts.score_atol)
            g = {**g, **{field: g[field][order] for field in ("labels", "bboxes", "scores")}}
        rows.append(exact_row(f"{key}.labels", r["labels"], g["labels"]))
        rows.append(abs_row(f"{key}.bboxes", r["bboxes"], g["bboxes"], opts.box_atol))
        rows.append(abs_row(f"{key}.scores", r["scores"], g["scores"], opts.score_atol))
        for field in ("labels", "bboxes", "scores"):
            torch_out[f"{key}.{field}"] = r[field]
            paddle_out[f"{key}.{field}"] = g[field]
        box_diff = (float(np.abs(r["bboxes"] - g["bboxes"]).max())
                    if n_ref == n_got and n_ref else (0.0 if n_ref == n_got else float("nan")))
        score_diff = (float(np.abs(r["scores"] - g["scores"]).max())
                      if n_ref == n_got and n_ref else (0.0 if n_ref == n_got else float("nan")))
        table.append(ImageRow(name, r["img_id"], n_ref, n_got,
                              float(r["scores"].max()) if n_ref else float("nan"),
                              float(r["scores"].min()) if n_ref else float("nan"), box_diff, score_diff, reordered))
    return rows, table


def test_sets_and_runs(opts) -> tuple:
    """What every stage that predicts on the tiny COCO's test set starts from.

    Args:
        opts: a stage's options with ``build_dir``, ``seed``, ``scale`` and ``ckpt``.
    Returns:
        ``(root, mmdet's test set, ours, runs)``: the tiny COCO's folder, the two
        datasets (the same images, checked), and the checkpoints to predict with as
        ``[(name, Checkpoints)]``: ``as_given``, and ``sharpened`` for the seeded
        checkpoint (`sharpened_checkpoint`).
    """
    root = tiny_coco_root(opts.build_dir, opts.seed)
    mm_ds = mmdet_dataset(mmdet_setup(), root, train=False, scale=opts.scale)
    our_ds = our_dataset(root, train=False, scale=opts.scale)
    if [mm_ds.get_data_info(i)["img_id"] for i in range(len(mm_ds))] != our_ds.img_ids:
        raise ValueError("the two test sets list different images; run python -m align.data first")
    given = prepare_checkpoints(opts.ckpt, opts.seed, opts.build_dir)
    runs = [("as_given", given)]
    if given.synthetic:
        sharp = sharpened_checkpoint(given, opts.seed, opts.build_dir)
        runs.append(("sharpened", prepare_checkpoints(str(sharp), opts.seed, opts.build_dir)))
    return root, mm_ds, our_ds, runs


def run_predict(opts: PredictOptions) -> StageResult:
    """Predict on both sides, diff, write ``predict*`` files into ``opts.reports``."""
    root, mm_ds, our_ds, runs = test_sets_and_runs(opts)

    rows: list[TensorDiff] = []
    table: list[ImageRow] = []
    torch_out: dict[str, np.ndarray] = {}
    paddle_out: dict[str, np.ndarray] = {}
    seconds = {"mmdet_s": 0.0, "paddle_s": 0.0}
    for name, ckpts in progress(runs, "predict"):
        t0 = time.perf_counter()
        ref = mmdet_predictions(build_torch_model(ckpts), mm_ds, opts.score_thr)
        seconds["mmdet_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        got = paddle_predictions(build_paddle_model(ckpts), our_ds, opts.score_thr)
        seconds["paddle_s"] += time.perf_counter() - t0
        r, t = compare_run(name, ref, got, opts, torch_out, paddle_out)
        rows += r
        table += t

    reprod = reprod_log_diff(paddle_out, torch_out, opts.reports, "predict", opts.score_atol)
    test_cfg = get_config()["test_cfg"]
    if opts.score_thr is not None:
        test_cfg["score_thr"] = opts.score_thr
    meta = {
        "seed": opts.seed,
        "tiny_coco": str(root),
        "resize_scale": list(opts.scale),
        "test_cfg": test_cfg,
        "score_thr_overridden": opts.score_thr is not None,
        "detections_per_run": {name: int(sum(row.detections_mmdet for row in table if row.run == name))
                               for name, _ in runs},
        "reordered_pairs": int(sum(row.reordered for row in table)),
        "worst_box_abs_diff_px": max((row.max_abs for row in rows if row.name.endswith(".bboxes")),
                                     default=float("nan")),
        "worst_score_abs_diff": max((row.max_abs for row in rows if row.name.endswith(".scores")),
                                    default=float("nan")),
        "checkpoints": {name: {"path": str(c.torch_path), "sha256": c.sha256} for name, c in runs},
        "checkpoint_synthetic": runs[0][1].synthetic,
        **{k: round(v, 2) for k, v in seconds.items()},
    }
    return write_report(StageResult(
        stage="predict",
        title="Predict: mmdet's model.predict vs Paddle's predict on tiny-COCO val images",
        passed=all(row.passed for row in rows),
        tensors=rows,
        thresholds={"boxes (abs px)": opts.box_atol, "scores (abs)": opts.score_atol,
                    "detection counts, labels": "exact"},
        meta=meta,
        extra_tables=[("Detections per run and image",
                       ["run", "img_id", "mmdet dets", "paddle dets", "max score", "min score",
                        "max |box diff| px", "max |score diff|", "reordered"], table)],
        reprod_log=reprod,
        reprod_log_threshold=opts.score_atol,
        reprod_log_check=opts.score_atol,
        headline=Headline.largest_abs([r for r in rows if r.name.endswith(".bboxes")], opts.box_atol,
                                      "largest box |diff|, px"),
        seconds={"mmdet": seconds["mmdet_s"], "paddle": seconds["paddle_s"]},
    ), opts.reports)


def first_divergence(result: StageResult) -> str | None:
    return first_failed_name(result.tensors)
