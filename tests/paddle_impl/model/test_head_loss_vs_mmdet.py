"""Targets and the head's per-level GHM loss vs mmdet's AnchorHead, on small batches."""
from __future__ import annotations

import numpy as np
import paddle
import pytest
import torch
from mmengine.structures import InstanceData

from align.ghm.sides import level_terms
from paddle_impl.model.detector import RetinaNet
from tests.mmdet_fixtures import build_mmdet_head, seeded

FEATS = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]  # a 128x192 batch
BATCH_SHAPE = (128, 192)


def batch(case: str):
    """(gt boxes, gt labels, img shapes) for a named case; image 1 is narrower."""
    big = [[10, 12, 120, 100], [50, 50, 80, 70], [150, 5, 191, 60]]
    boxes = {
        "mixed": [big, [], [[30, 40, 60, 90]]],
        "degenerate": [[[40, 40, 40, 80], [10, 10, 60, 60]], [[5, 5, 5, 5]], []],
        "duplicates": [[[10, 10, 60, 60], [10, 10, 60, 60], [20, 20, 90, 90]], [], [[0, 0, 191, 127]]],
        "empty": [[], [], []],
    }[case]
    rng = np.random.default_rng(0)
    gt_bboxes = [np.asarray(b, np.float32).reshape(-1, 4) for b in boxes]
    gt_labels = [rng.integers(0, 80, len(b)).astype(np.int64) for b in gt_bboxes]
    img_shapes = [(128, 192), (100, 150), (128, 170)]
    pad_shapes = [(-(-h // 32) * 32, -(-w // 32) * 32) for h, w in img_shapes]
    return gt_bboxes, gt_labels, img_shapes, pad_shapes


def mmdet_batch(gt_bboxes, gt_labels, img_shapes, pad_shapes):
    gts = [InstanceData(bboxes=torch.from_numpy(b), labels=torch.from_numpy(l))
           for b, l in zip(gt_bboxes, gt_labels)]
    metas = [dict(img_shape=s, pad_shape=p, batch_input_shape=BATCH_SHAPE) for s, p in
             zip(img_shapes, pad_shapes)]
    return gts, metas


@pytest.fixture(scope="module")
def heads():
    torch.manual_seed(0)
    return build_mmdet_head(), RetinaNet.from_config()


@pytest.mark.parametrize("case", ["mixed", "degenerate", "duplicates", "empty"])
def test_targets_equal_mmdet(heads, case):
    t_head, model = heads
    gt_bboxes, gt_labels, img_shapes, pad_shapes = batch(case)
    gts, metas = mmdet_batch(gt_bboxes, gt_labels, img_shapes, pad_shapes)
    anchors, valid = t_head.get_anchors([torch.Size(f) for f in FEATS], metas, device="cpu")
    t_labels, t_lw, t_bt, t_bw, _ = t_head.get_targets(anchors, valid, gts, metas)
    ours = model.target_builder(FEATS, gt_bboxes, gt_labels, pad_shapes)
    for level, (l, lw, bt, bw) in enumerate(zip(t_labels, t_lw, t_bt, t_bw)):
        p = ours.levels[level]
        np.testing.assert_array_equal(p.labels.numpy(), l.numpy())
        np.testing.assert_array_equal(p.label_weights.numpy(), lw.numpy())
        np.testing.assert_allclose(p.bbox_targets.numpy(), bt.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(p.bbox_weights.numpy(), bw.numpy())
    all_l = torch.cat(t_labels, 1).numpy()
    np.testing.assert_array_equal(ours.num_pos.numpy(), (all_l != 80).sum(1))
    # Anchors outside image 1's own padded shape carry no weight.
    assert float(ours.levels[0].label_weights[1].sum()) < ours.levels[0].label_weights.shape[1]


def head_outputs(seed):
    cls = [seeded((3, 9 * 80, h, w), seed=seed + i, scale=2.0) - 4.0 for i, (h, w) in enumerate(FEATS)]
    box = [seeded((3, 36, h, w), seed=seed + 10 + i, scale=0.3) for i, (h, w) in enumerate(FEATS)]
    return cls, box


@pytest.mark.parametrize("case", ["mixed", "degenerate", "empty"])
def test_per_level_losses_and_momentum_equal_mmdet_over_iterations(case):
    torch.manual_seed(0)
    t_head = build_mmdet_head()
    model = RetinaNet.from_config()
    p_head = model.bbox_head
    gt_bboxes, gt_labels, img_shapes, pad_shapes = batch(case)
    gts, metas = mmdet_batch(gt_bboxes, gt_labels, img_shapes, pad_shapes)
    for it in range(4):  # 20 calls of each GHM module
        cls, box = head_outputs(seed=100 * it)
        t_losses = t_head.loss_by_feat([torch.from_numpy(c) for c in cls],
                                       [torch.from_numpy(b) for b in box], gts, metas)
        targets = model.target_builder(FEATS, gt_bboxes, gt_labels, pad_shapes)
        p_losses = p_head.loss([paddle.to_tensor(c) for c in cls], [paddle.to_tensor(b) for b in box],
                               targets)
        t_terms, p_terms = level_terms(t_losses), level_terms(p_losses)
        for key, ref in t_terms.items():
            assert np.isfinite(p_terms[key]) == np.isfinite(ref)
            np.testing.assert_allclose(p_terms[key], ref, rtol=1e-6, atol=1e-9, err_msg=f"iteration {it} {key}")
        for name in ("loss_cls", "loss_bbox"):
            np.testing.assert_allclose(getattr(p_head, name).acc_sum.numpy(),
                                       getattr(t_head, name).acc_sum.numpy(), rtol=1e-6, err_msg=name)
    if case == "empty":
        assert all(float(v) == 0 for v in p_losses["loss_bbox"])
