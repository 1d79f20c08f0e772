"""Inference post-processing vs mmdet's RetinaHead.predict_by_feat, NMS vs mmcv's
batched_nms, and COCO box evaluation vs mmdet's CocoMetric."""
from __future__ import annotations

import json

import numpy as np
import paddle
import pytest
import torch

from tests.mmdet_fixtures import build_mmdet, mmdet_model_cfg, seeded
from paddle_impl.evaluation.coco_eval import BBOX_METRIC_NAMES, detections_to_coco_json, evaluate_bbox
from paddle_impl.config import get_config
from paddle_impl.boxes.postprocess import batched_nms, filter_scores_and_topk, predict_boxes

FEATS = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]  # a 128x192 batch
NUM_CLASSES = 80
NUM_ANCHORS = 9
# Two images of one batch: different resized shapes and scale factors (w, h).
METAS = [
    dict(img_shape=(128, 192), scale_factor=(1.5, 1.6)),
    dict(img_shape=(100, 150), scale_factor=(0.75, 0.7)),
]


@pytest.fixture(scope="module")
def mmdet_head():
    """mmdet's RetinaHead and the reference test_cfg (a ConfigDict, as the head reads it)."""
    cfg = mmdet_model_cfg()
    torch.manual_seed(0)
    return build_mmdet(cfg.bbox_head), cfg.test_cfg


def head_outputs(case: str):
    """Per-level ``(cls (2, A*C, H, W), reg (2, A*4, H, W))`` float32 arrays for a named case."""
    cls = [np.full((2, NUM_ANCHORS * NUM_CLASSES, h, w), -8.0, np.float32) for h, w in FEATS]
    reg = [seeded((2, NUM_ANCHORS * 4, h, w), seed=10 + i, scale=0.5) for i, (h, w) in enumerate(FEATS)]
    if case == "dense":
        # About 60% of all (anchor, class) pairs pass score_thr: nms_pre cuts
        # the first two levels, NMS and max_per_img have work to do.
        cls = [seeded(c.shape, seed=i, scale=1.5) - 2.5 for i, c in enumerate(cls)]
    elif case == "sparse":
        # A few dozen candidates in all, no level reaches nms_pre.
        cls = [seeded(c.shape, seed=20 + i, scale=1.0) - 6.5 for i, c in enumerate(cls)]
    elif case == "identical_boxes":
        # Deltas at the clamp make every box cover the whole image, so after
        # clipping all boxes of an image are identical; within a class all
        # anchors share one logit (thousands of exact ties, cut by nms_pre on
        # level 0). NMS keeps one box per class whichever tie it picks.
        reg = [np.full_like(r, 0.0) for r in reg]
        for r in reg:
            r.reshape(2, NUM_ANCHORS, 4, *r.shape[-2:])[:, :, 2:] = 5.0
        for c in cls:
            view = c.reshape(2, NUM_ANCHORS, NUM_CLASSES, *c.shape[-2:])
            for label, logit in [(3, 1.0), (17, 0.5), (42, -1.0)]:
                view[:, :, label] = logit
    elif case == "overlapping_ties":
        # At one location all 9 anchors (overlapping boxes) of class 5 share a
        # score, and 5 anchors of class 9 at a neighbour share another: 14
        # candidates, so torch's sort is still stable and the tie order, and
        # so which overlapping box NMS keeps, must agree exactly.
        reg = [np.zeros_like(r) for r in reg]
        view = cls[1].reshape(2, NUM_ANCHORS, NUM_CLASSES, *FEATS[1])
        view[:, :, 5, 3, 4] = 0.3
        view[:, :5, 9, 3, 5] = 0.3
    elif case == "first_image_empty":
        # Image 0 has no candidate at all, image 1 many: the batch's detections
        # are listed image after image, so image 1's must not shift into image 0.
        cls = [seeded(c.shape, seed=30 + i, scale=1.5) - 2.5 for i, c in enumerate(cls)]
        for c in cls:
            c[0] = -8.0
    else:
        assert case == "none", case
    return cls, reg


def run_both(mmdet_head, cls, reg):
    head, test_cfg = mmdet_head
    with torch.no_grad():
        ref = head.predict_by_feat([torch.from_numpy(c) for c in cls], [torch.from_numpy(r) for r in reg],
                                   batch_img_metas=METAS, cfg=test_cfg, rescale=True)
    ours = predict_boxes([paddle.to_tensor(c) for c in cls], [paddle.to_tensor(r) for r in reg], METAS)
    return ref, ours


def assert_same_detections(ref, ours):
    assert len(ref) == len(ours)
    for r, o in zip(ref, ours):
        assert tuple(o.bboxes.shape) == (len(r.scores), 4)
        assert o.bboxes.dtype == paddle.float32 and o.labels.dtype == paddle.int64
        np.testing.assert_allclose(o.bboxes.numpy(), r.bboxes.numpy(), rtol=0, atol=1e-3)
        np.testing.assert_allclose(o.scores.numpy(), r.scores.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_array_equal(o.labels.numpy(), r.labels.numpy())


def test_test_cfg_matches_reference(mmdet_head):
    _, test_cfg = mmdet_head
    ours = get_config()["test_cfg"]
    assert ours["nms_pre"] == test_cfg.nms_pre and ours["score_thr"] == test_cfg.score_thr
    assert ours["min_bbox_size"] == test_cfg.min_bbox_size and ours["max_per_img"] == test_cfg.max_per_img
    assert test_cfg.nms == dict(type="nms", iou_threshold=ours["nms_iou_threshold"])


@pytest.mark.parametrize("case", ["dense", "sparse", "none", "identical_boxes", "overlapping_ties",
                                  "first_image_empty"])
def test_predict_boxes_equal_mmdet(mmdet_head, case):
    cls, reg = head_outputs(case)
    ref, ours = run_both(mmdet_head, cls, reg)
    assert_same_detections(ref, ours)
    counts = [len(r.scores) for r in ref]
    thr, nms_pre = get_config()["test_cfg"]["score_thr"], get_config()["test_cfg"]["nms_pre"]
    candidates = [int((1 / (1 + np.exp(-c[0])) > thr).sum()) for c in cls]
    if case == "dense":
        assert candidates[0] > nms_pre and candidates[1] > nms_pre and counts == [100, 100]
    elif case == "sparse":
        assert 0 < sum(candidates) < nms_pre and 0 < min(counts)
    elif case == "none":
        assert counts == [0, 0]
    elif case == "identical_boxes":
        assert candidates[0] > nms_pre and counts == [3, 3]
        h, w = METAS[1]["img_shape"]
        sw, sh = METAS[1]["scale_factor"]
        np.testing.assert_allclose(ours[1].bboxes.numpy(), [[0, 0, w / sw, h / sh]] * 3, atol=1e-3)
    elif case == "overlapping_ties":
        assert 1 < counts[0] < 14
    elif case == "first_image_empty":
        assert counts == [0, 100]


def test_filter_scores_and_topk_equals_mmdet():
    from mmdet.models.utils import filter_scores_and_topk as mmdet_filter

    # Distinct scores (a permutation of a fine grid): with ties, torch's order is arbitrary.
    num = 3000 * NUM_CLASSES
    probs = (np.random.default_rng(5).permutation(num) / num).astype(np.float32).reshape(3000, NUM_CLASSES)
    for thr, topk in [(0.05, 1000), (0.9, 1000), (0.999, 1000), (0.05, 7)]:
        ref_scores, ref_labels, ref_idxs, _ = mmdet_filter(torch.from_numpy(probs), thr, topk)
        scores, labels, idxs = filter_scores_and_topk(paddle.to_tensor(probs), thr, topk)
        np.testing.assert_array_equal(scores.numpy(), ref_scores.numpy())
        np.testing.assert_array_equal(labels.numpy(), ref_labels.numpy())
        np.testing.assert_array_equal(idxs.numpy(), ref_idxs.numpy())
    # Up to 16 tied candidates torch's sort is stable too: equal scores stay
    # in (anchor, class) order on both sides.
    tied = np.zeros((20, 4), np.float32)
    tied[[1, 4, 7, 8, 13], [0, 3, 1, 1, 2]] = 0.5
    tied[[2, 19], [2, 0]] = 0.7
    ref = mmdet_filter(torch.from_numpy(tied), 0.05, 6)
    ours = filter_scores_and_topk(paddle.to_tensor(tied), 0.05, 6)
    for o, r in zip(ours, ref[:3]):
        np.testing.assert_array_equal(o.numpy(), r.numpy())
    # Beyond 16 ties torch's order is arbitrary; ours stays (anchor, class) order.
    many = np.full((50, 4), 0.5, np.float32)
    _, labels, idxs = filter_scores_and_topk(paddle.to_tensor(many), 0.05, 120)
    np.testing.assert_array_equal(idxs.numpy() * 4 + labels.numpy(), np.arange(120))


def random_boxes(rng, n, integer=False):
    if integer:
        # A coarse grid: many pairs at an IoU of exactly 0.5, zero-area boxes.
        xy = rng.integers(0, 12, (n, 2)) * 2.0
        wh = rng.integers(0, 6, (n, 2)) * 2.0
    else:
        xy = rng.uniform(0, 300, (n, 2))
        wh = rng.uniform(1, 80, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def nms_both(boxes, scores, labels, iou=0.5):
    from mmcv.ops import batched_nms as mmcv_batched_nms

    _, ref = mmcv_batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                              torch.from_numpy(labels), dict(type="nms", iou_threshold=iou))
    ours = batched_nms(paddle.to_tensor(boxes), paddle.to_tensor(scores), paddle.to_tensor(labels), iou)
    return ref.numpy(), ours.numpy()


@pytest.mark.parametrize("integer", [False, True])
def test_batched_nms_equals_mmcv_without_ties(integer):
    rng = np.random.default_rng(7 + integer)
    for n, num_labels, iou in [(3000, 5, 0.5), (500, 1, 0.5), (800, 3, 0.3)]:
        boxes = random_boxes(rng, n, integer)
        scores = (rng.permutation(n) / n).astype(np.float32)  # distinct scores
        labels = rng.integers(0, num_labels, n)
        ref, ours = nms_both(boxes, scores, labels, iou)
        np.testing.assert_array_equal(ours, ref)
        assert 0 < len(ours) < n


def test_batched_nms_ties():
    rng = np.random.default_rng(3)
    # At most 16 boxes: torch sorts them stably as well, so even tied scores
    # over overlapping boxes of one class give the same survivors.
    boxes = random_boxes(rng, 16, integer=True)
    boxes[5] = boxes[2]
    scores = np.array([0.5] * 8 + [0.7] * 8, np.float32)
    labels = np.array([0, 1] * 8)
    ref, ours = nms_both(boxes, scores, labels)
    np.testing.assert_array_equal(ours, ref)
    # Many identical boxes with one score per label: which copy survives is
    # up to each sort, but the surviving (box, score, label) are the same.
    boxes = np.tile(np.array([[10, 20, 50, 60]], np.float32), (300, 1))
    labels = np.arange(300) % 4
    scores = (0.2 + 0.1 * labels).astype(np.float32)
    ref, ours = nms_both(boxes, scores, labels)
    assert len(ours) == len(ref) == 4
    np.testing.assert_array_equal(ours, [3, 2, 1, 0])  # ours keeps the first copy of each
    np.testing.assert_array_equal(labels[ours], labels[ref])
    np.testing.assert_array_equal(scores[ours], scores[ref])
    # Empty input.
    empty = batched_nms(paddle.zeros([0, 4]), paddle.zeros([0]), paddle.zeros([0], dtype="int64"), 0.5)
    assert tuple(empty.shape) == (0,)


def test_predict_runs_the_model_then_post_processes():
    from paddle_impl.model.detector import RetinaNet

    paddle.seed(0)
    model = RetinaNet.from_config()
    images = paddle.to_tensor(seeded((2, 3, 64, 96), seed=1))
    metas = [dict(img_shape=(64, 96), scale_factor=(0.5, 0.5)), dict(img_shape=(60, 80), scale_factor=(1.0, 1.0))]
    cfg = dict(get_config()["test_cfg"], score_thr=0.0)  # freshly initialised scores are about 0.01
    results = model.predict(images, metas, cfg=cfg)
    with paddle.no_grad():
        expected = predict_boxes(*model(images), metas, cfg=cfg)
    for r, e, meta in zip(results, expected, metas):
        assert r.bboxes.shape[0] == cfg["max_per_img"]
        np.testing.assert_array_equal(r.bboxes.numpy(), e.bboxes.numpy())
        (h, w), (sw, sh) = meta["img_shape"], meta["scale_factor"]
        assert r.bboxes.numpy().min() >= 0
        assert (r.bboxes.numpy()[:, [2, 3]] <= [w / sw + 1e-3, h / sh + 1e-3]).all()


# ---------------------------------------------------------------- COCO evaluation

CATEGORIES = [dict(id=1, name="person"), dict(id=3, name="car"), dict(id=7, name="train"), dict(id=12, name="sign")]
CAT_IDS = [c["id"] for c in CATEGORIES]
IMAGES = [dict(id=i, width=w, height=h, file_name=f"{i}.jpg")
          for i, (w, h) in zip([4, 9, 11, 20, 21, 30], [(640, 480), (500, 375), (320, 320), (800, 600), (256, 400), (640, 427)])]


def ground_truth(rng):
    """COCO annotations: small, medium and large boxes, one crowd box, one image without objects."""
    anns = []
    for img in IMAGES[:-1]:
        for _ in range(rng.integers(2, 7)):
            side = rng.choice([12.0, 24.0, 60.0, 150.0]) * rng.uniform(0.8, 1.2, 2)
            x = rng.uniform(0, img["width"] - side[0])
            y = rng.uniform(0, img["height"] - side[1])
            anns.append(dict(id=len(anns) + 1, image_id=img["id"], category_id=int(rng.choice(CAT_IDS)),
                             bbox=[float(x), float(y), float(side[0]), float(side[1])],
                             area=float(side[0] * side[1]), iscrowd=0))
    anns[3]["iscrowd"] = 1
    return dict(images=IMAGES, annotations=anns, categories=CATEGORIES)


def detections(gt, rng, perfect=False):
    """Per image ``(bboxes xyxy float32, scores float32, labels int64)``: jittered ground truth
    with some wrong labels, plus false positives; image 9's 150 false positives outrank its
    true boxes, so AR@100 < AR@300."""
    results = []
    for img in IMAGES:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"] and not (perfect and a["iscrowd"])]
        boxes = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        labels = np.array([CAT_IDS.index(a["category_id"]) for a in anns], np.int64)
        boxes[:, 2:] += boxes[:, :2]
        if not perfect:
            boxes += rng.normal(0, 3, boxes.shape)
            labels = np.where(rng.random(len(labels)) < 0.2, rng.integers(0, 4, len(labels)), labels)
            num_fp = 150 if img["id"] == 9 else int(rng.integers(0, 8))
            fp = rng.uniform(0, min(img["width"], img["height"]) - 40, (num_fp, 2))
            boxes = np.concatenate([boxes, np.concatenate([fp, fp + rng.uniform(5, 40, (num_fp, 2))], 1)])
            # pycocotools applies maxDets per image and category: image 9's
            # false positives all share its first box's label.
            fp_labels = np.full(num_fp, labels[0]) if img["id"] == 9 else rng.integers(0, 4, num_fp)
            labels = np.concatenate([labels, fp_labels])
        scores = rng.uniform(0.05, 1.0, len(labels)) if not perfect else np.ones(len(labels))
        if img["id"] == 9 and not perfect:  # the true boxes rank behind the 150 false ones
            scores[: len(anns)] = rng.uniform(0.01, 0.04, len(anns))
        results.append((boxes.astype(np.float32), scores.astype(np.float32), labels.astype(np.int64)))
    return results


@pytest.fixture()
def coco_files(tmp_path):
    rng = np.random.default_rng(0)
    gt = ground_truth(rng)
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(gt))
    return ann_file, gt, rng


def mmdet_coco_metric(ann_file, results, monkeypatch):
    """mmdet's CocoMetric on ``results``: (its reported dict, the raw COCOeval.stats it saw, its json records)."""
    from mmdet.evaluation import CocoMetric
    from mmdet.evaluation.metrics import coco_metric

    seen = {}

    class RecordingCOCOeval(coco_metric.COCOeval):
        def summarize(self):
            super().summarize()
            seen["stats"] = self.stats.copy()

    monkeypatch.setattr(coco_metric, "COCOeval", RecordingCOCOeval)
    items = [name[len("bbox_"):] for name in BBOX_METRIC_NAMES]
    metric = CocoMetric(ann_file=str(ann_file), metric="bbox", metric_items=items)
    metric.dataset_meta = dict(classes=[c["name"] for c in CATEGORIES])
    samples = [dict(img_id=img["id"], ori_shape=(img["height"], img["width"]),
                    pred_instances=dict(bboxes=torch.from_numpy(b), scores=torch.from_numpy(s),
                                        labels=torch.from_numpy(l)))
               for img, (b, s, l) in zip(IMAGES, results)]
    metric.process({}, samples)
    reported = metric.compute_metrics(metric.results)
    records_file = metric.results2json([r for _, r in metric.results], str(ann_file.parent / "mmdet"))["bbox"]
    with open(records_file) as f:
        records = json.load(f)
    return reported, seen.get("stats"), records


def test_coco_metrics_equal_mmdet(coco_files, monkeypatch, tmp_path):
    ann_file, gt, rng = coco_files
    results = detections(gt, rng)
    out_file = tmp_path / "out" / "dets.bbox.json"
    records = detections_to_coco_json([(paddle.to_tensor(b), paddle.to_tensor(s), paddle.to_tensor(l))
                                       for b, s, l in results], [img["id"] for img in IMAGES], CAT_IDS,
                                      out_file=out_file)
    ours = evaluate_bbox(ann_file, records)
    reported, stats, mmdet_records = mmdet_coco_metric(ann_file, results, monkeypatch)

    assert records == mmdet_records
    assert json.loads(out_file.read_text()) == records
    assert [p.name for p in out_file.parent.iterdir()] == [out_file.name]
    assert list(ours) == list(BBOX_METRIC_NAMES)
    np.testing.assert_array_equal(np.array(list(ours.values())), stats)
    assert {k: round(v, 3) for k, v in ours.items()} == reported
    assert evaluate_bbox(ann_file, out_file, ndigits=3) == reported
    # The file's detections exercise what the numbers should show.
    assert 0 < ours["bbox_mAP"] < 1 and ours["bbox_AR@100"] < ours["bbox_AR@300"]
    assert min(ours[k] for k in ("bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l")) >= 0


def test_perfect_detections_give_ap_one(coco_files, monkeypatch):
    ann_file, gt, rng = coco_files
    results = detections(gt, rng, perfect=True)
    records = detections_to_coco_json(results, [img["id"] for img in IMAGES], CAT_IDS)
    ours = evaluate_bbox(ann_file, records)
    reported, stats, _ = mmdet_coco_metric(ann_file, results, monkeypatch)
    np.testing.assert_array_equal(np.array(list(ours.values())), stats)
    for name, value in ours.items():
        assert value == 1.0, name


def test_no_detections_give_no_metrics(coco_files, monkeypatch):
    ann_file, _, _ = coco_files
    empty = [(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))] * len(IMAGES)
    records = detections_to_coco_json(empty, [img["id"] for img in IMAGES], CAT_IDS)
    assert records == []
    reported, stats, _ = mmdet_coco_metric(ann_file, empty, monkeypatch)
    assert evaluate_bbox(ann_file, records) == reported == {} and stats is None
