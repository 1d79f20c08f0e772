"""Anchors, box coder and Max-IoU assigner against mmdet 3.3.0's own classes.

Integer outputs must match exactly, floats to 1e-6 (decoded boxes: 1e-6 of
their coordinates' magnitude, see ``assert_boxes_close``). Inputs are seeded;
the hypothesis cases are derandomized so every run sees the same examples.
"""
from __future__ import annotations

import warnings

import numpy as np
import paddle
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mmengine.structures import InstanceData

from mmdet.models.task_modules import AnchorGenerator as MMAnchorGenerator
from mmdet.models.task_modules import DeltaXYWHBBoxCoder as MMDeltaXYWHBBoxCoder
from mmdet.models.task_modules import MaxIoUAssigner as MMMaxIoUAssigner
from mmdet.structures.bbox import bbox_overlaps as mm_bbox_overlaps

from paddle_impl.boxes.anchors import AnchorGenerator
from paddle_impl.boxes.assigner import MaxIoUAssigner
from paddle_impl.boxes.box_coder import DeltaXYWHBBoxCoder
from paddle_impl.config import get_config
from paddle_impl.boxes.iou import bbox_overlaps

FEW = settings(max_examples=12, deadline=None, derandomize=True)
ATOL = 1e-6

GEN_CFG = get_config()["bbox_head"]["anchor_generator"]


def pd(array, dtype="float32"):
    return paddle.to_tensor(np.asarray(array), dtype=dtype)


def th(array, dtype=torch.float32):
    return torch.as_tensor(np.asarray(array), dtype=dtype)


def npy(tensor):
    if isinstance(tensor, np.ndarray):
        return tensor
    return tensor.numpy() if isinstance(tensor, paddle.Tensor) else tensor.detach().cpu().numpy()


def featmap_sizes(img_h, img_w):
    """Feature sizes of P3-P7 for an input of (img_h, img_w): every stride-2 stage rounds up."""
    sizes, h, w = [], -(-img_h // 8), -(-img_w // 8)
    for _ in range(5):
        sizes.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    return sizes


def random_boxes(rng, n, img_h, img_w, min_size=1.0):
    """(n, 4) float32 boxes with positive size inside an (img_h, img_w) canvas."""
    x1 = rng.uniform(0, img_w - min_size, n)
    y1 = rng.uniform(0, img_h - min_size, n)
    w = rng.uniform(min_size, img_w / 2, n)
    h = rng.uniform(min_size, img_h / 2, n)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)


# --------------------------------------------------------------------------- anchors


@pytest.fixture(scope="module")
def generators():
    ours = AnchorGenerator.from_config()
    ref = MMAnchorGenerator(
        strides=GEN_CFG["strides"],
        ratios=GEN_CFG["ratios"],
        octave_base_scale=GEN_CFG["octave_base_scale"],
        scales_per_octave=GEN_CFG["scales_per_octave"],
    )
    return ours, ref


@pytest.mark.parametrize(
    "sizes",
    [
        [(1, 1)] * 5,
        [(25, 38), (13, 19), (7, 10), (4, 5), (2, 3)],
        [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)],
        [(3, 1), (1, 3), (2, 1), (1, 2), (1, 1)],
        [(9, 7), (5, 4), (3, 2), (2, 1), (1, 1)],
    ],
)
def test_grid_anchors_equal_mmdet(generators, sizes):
    ours, ref = generators
    got = ours.grid_anchors(sizes)
    want = ref.grid_priors(sizes, device="cpu")
    assert ours.num_base_anchors == ref.num_base_anchors
    for level, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == paddle.float32
        assert tuple(g.shape) == tuple(w.shape), level
        np.testing.assert_array_equal(npy(g), npy(w))


def test_anchors_at_indices_equal_mmdet_grid_rows(generators):
    """The rows the exported post-processing forms from flat indices alone, on a wide P3 map."""
    ours, ref = generators
    sizes = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
    want = ref.grid_priors(sizes, device="cpu")
    rng = np.random.default_rng(0)
    for level, (feat_h, feat_w) in enumerate(sizes):
        count = feat_h * feat_w * ours.num_base_anchors[level]
        idxs = np.concatenate([[0, count - 1], rng.integers(0, count, (2, 49)).ravel()]).reshape(2, 50)
        got = ours.anchors_at(level, paddle.to_tensor(idxs), feat_w)
        assert tuple(got.shape) == (2, 50, 4) and got.dtype == paddle.float32
        np.testing.assert_array_equal(npy(got), npy(want[level])[idxs])


def test_anchor_layout_is_location_major_ratio_major(generators):
    ours, _ = generators
    feat_h, feat_w, level = 3, 5, 1
    stride = GEN_CFG["strides"][level]
    anchors = npy(ours.grid_anchors([(1, 1)] * level + [(feat_h, feat_w)] + [(1, 1)] * 3)[level])
    base = npy(ours.base_anchors[level])
    num_scales = GEN_CFG["scales_per_octave"]
    num_anchors = len(GEN_CFG["ratios"]) * num_scales
    for y, x, a in [(0, 0, 0), (0, 4, 5), (2, 1, 8), (1, 3, 4)]:
        shift = np.array([x, y, x, y], np.float32) * stride
        np.testing.assert_array_equal(anchors[(y * feat_w + x) * num_anchors + a], base[a] + shift)
    # Ratio-major: anchor a has ratio a // num_scales and scale a % num_scales.
    wh = base[:, 2:] - base[:, :2]
    for a in range(num_anchors):
        ratio = GEN_CFG["ratios"][a // num_scales]
        scale = GEN_CFG["octave_base_scale"] * 2 ** ((a % num_scales) / num_scales)
        np.testing.assert_allclose(wh[a, 1] / wh[a, 0], ratio, rtol=1e-6)
        np.testing.assert_allclose(np.sqrt(wh[a, 0] * wh[a, 1]), stride * scale, rtol=1e-6)
    np.testing.assert_array_equal(base[:, :2], -base[:, 2:])


@pytest.mark.parametrize(
    "batch_shape, pad_shape",
    [
        ((800, 1344), (800, 1344)),
        ((800, 1344), (608, 800)),
        ((800, 1344), (800, 1056, 3)),
        ((96, 160), (33, 65)),
        ((96, 160), (1, 1)),
        ((64, 64), (64, 40)),
    ],
)
def test_valid_flags_equal_mmdet(generators, batch_shape, pad_shape):
    ours, ref = generators
    sizes = featmap_sizes(*batch_shape)
    got = ours.valid_flags(sizes, pad_shape)
    want = ref.valid_flags(sizes, pad_shape, device="cpu")
    some_invalid = False
    for g, w in zip(got, want):
        assert g.dtype == paddle.bool
        np.testing.assert_array_equal(npy(g), npy(w))
        some_invalid |= not bool(npy(w).all())
    assert some_invalid == (tuple(pad_shape[:2]) != tuple(batch_shape))


# --------------------------------------------------------------------------- iou


@pytest.mark.parametrize("mode", ["iou", "iof"])
def test_bbox_overlaps_equal_mmdet(mode):
    rng = np.random.default_rng(0)
    boxes1 = random_boxes(rng, 40, 100, 120)
    boxes2 = np.concatenate(
        [
            random_boxes(rng, 30, 100, 120),
            boxes1[:3],  # identical boxes: IoU 1
            # zero width, a point, far away, inverted corners
            np.array(
                [[5, 5, 5, 9], [7, 7, 7, 7], [200, 200, 210, 220], [10, 10, 4, 4]], np.float32
            ),
        ]
    )
    got = npy(bbox_overlaps(pd(boxes1), pd(boxes2), mode=mode))
    want = npy(mm_bbox_overlaps(th(boxes1), th(boxes2), mode=mode))
    np.testing.assert_array_equal(got, want)
    batched = bbox_overlaps(
        pd(np.stack([boxes1, boxes1[::-1]])), pd(np.stack([boxes2, boxes2])), mode=mode
    )
    batched = npy(batched)
    np.testing.assert_array_equal(batched[0], want)
    np.testing.assert_array_equal(batched[1], want[::-1])
    empty = pd(np.zeros((0, 4)))
    assert tuple(bbox_overlaps(empty, pd(boxes2), mode=mode).shape) == (0, len(boxes2))
    assert tuple(bbox_overlaps(pd(boxes1), empty, mode=mode).shape) == (len(boxes1), 0)


# --------------------------------------------------------------------------- box coder


def assert_boxes_close(got, want, unclipped=None):
    """Decoded boxes agree to 1e-6 relative to their coordinates' magnitude.

    torch's and Paddle's float32 ``exp`` differ by one ulp on some inputs; in
    ``x1 = cx - w / 2`` that ulp of ``w`` is kept even when ``x1`` itself is
    near 0, so the bound is relative to ``max(|x1|, |x2|) = |cx| + w / 2`` of
    the boxes before clipping (``unclipped``, by default ``want``).
    """
    got, want = npy(got), npy(want)
    assert got.shape == want.shape
    unclipped = want if unclipped is None else npy(unclipped)
    boxes = np.abs(unclipped).reshape(-1, 2, 2)  # (box, corner, xy)
    scale = np.broadcast_to(boxes.max(axis=1, keepdims=True), boxes.shape).reshape(want.shape)
    np.testing.assert_array_less(np.abs(got - want), 1e-6 * scale + ATOL)


CODER_SETTINGS = [
    dict(target_means=(0.0, 0.0, 0.0, 0.0), target_stds=(1.0, 1.0, 1.0, 1.0)),
    dict(target_means=(0.1, -0.2, 0.05, 0.0), target_stds=(0.1, 0.1, 0.2, 0.3)),
    dict(clip_border=False),
    dict(add_ctr_clamp=True, ctr_clamp=16),
]


@FEW
@given(seed=st.integers(0, 2**16), setting=st.sampled_from(CODER_SETTINGS))
def test_encode_equals_mmdet_and_round_trips(seed, setting):
    rng = np.random.default_rng(seed)
    # Sizes within 10..200 keep |dw|, |dh| below the decode clamp, so decoding inverts encoding.
    anchors = random_boxes(rng, 200, 300, 400, min_size=10)
    gts = random_boxes(rng, 200, 300, 400, min_size=10)
    ours = DeltaXYWHBBoxCoder(**setting)
    ref = MMDeltaXYWHBBoxCoder(**setting)
    deltas = ours.encode(pd(anchors), pd(gts))
    want = ref.encode(th(anchors), th(gts))
    np.testing.assert_allclose(npy(deltas), npy(want), rtol=1e-6, atol=ATOL)
    if not setting.get("add_ctr_clamp"):
        back = ours.decode(pd(anchors), deltas)
        np.testing.assert_allclose(npy(back), gts, rtol=1e-5, atol=1e-3)


@FEW
@given(
    seed=st.integers(0, 2**16),
    setting=st.sampled_from(CODER_SETTINGS),
    num_sets=st.sampled_from([1, 3]),
    max_shape=st.sampled_from([None, (300, 400), (123, 77, 3)]),
    wh_ratio_clip=st.sampled_from([16 / 1000, 0.1]),
)
def test_decode_equals_mmdet(seed, setting, num_sets, max_shape, wh_ratio_clip):
    rng = np.random.default_rng(seed)
    anchors = random_boxes(rng, 300, 300, 400)
    # A third of the deltas are far outside the dw/dh clamp and push boxes off the image.
    deltas = rng.normal(0, 1, (300, 4 * num_sets)).astype(np.float32)
    deltas[::3] *= 12
    ours = DeltaXYWHBBoxCoder(**setting)
    ref = MMDeltaXYWHBBoxCoder(**setting)
    got = ours.decode(pd(anchors), pd(deltas), max_shape=max_shape, wh_ratio_clip=wh_ratio_clip)
    want = ref.decode(th(anchors), th(deltas), max_shape=max_shape, wh_ratio_clip=wh_ratio_clip)
    unclipped = ref.decode(th(anchors), th(deltas), wh_ratio_clip=wh_ratio_clip)
    assert tuple(got.shape) == tuple(want.shape) == (300, 4 * num_sets)
    assert_boxes_close(got, want, unclipped)


def test_decode_clamps_extreme_deltas_and_clips():
    coder = DeltaXYWHBBoxCoder()
    anchors = pd([[10, 10, 20, 30], [0, 0, 8, 8]])
    deltas = pd([[0, 0, 50, -50], [100, -100, 0, 0]])
    got = npy(coder.decode(anchors, deltas))
    limit = 1000 / 16
    np.testing.assert_allclose(got[0, 2] - got[0, 0], 10 * limit, rtol=1e-6)
    np.testing.assert_allclose(got[0, 3] - got[0, 1], 20 / limit, rtol=1e-6)
    clipped = npy(coder.decode(anchors, deltas, max_shape=(25, 40)))
    assert clipped[:, 0::2].min() >= 0 and clipped[:, 0::2].max() <= 40
    assert clipped[:, 1::2].min() >= 0 and clipped[:, 1::2].max() <= 25
    ref = MMDeltaXYWHBBoxCoder()
    want = ref.decode(th(npy(anchors)), th(npy(deltas)), max_shape=(25, 40))
    assert_boxes_close(clipped, want, got)
    assert tuple(coder.decode(pd(np.zeros((0, 4))), pd(np.zeros((0, 4)))).shape) == (0, 4)


@pytest.mark.parametrize("max_shape_kind", ["none", "shared", "list", "tensor"])
def test_batched_decode_equals_mmdet(max_shape_kind):
    rng = np.random.default_rng(3)
    anchors = np.stack([random_boxes(rng, 150, 200, 300) for _ in range(2)])
    deltas = (rng.normal(0, 1, (2, 150, 4)) * 5).astype(np.float32)
    shapes = [(200, 300), (131, 97)]
    max_shape = {
        "none": (None, None),
        "shared": ((160, 250), (160, 250)),
        "list": (shapes, shapes),
        "tensor": (pd(shapes), th(shapes)),
    }[max_shape_kind]
    got = DeltaXYWHBBoxCoder().decode(pd(anchors), pd(deltas), max_shape=max_shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = MMDeltaXYWHBBoxCoder().decode(th(anchors), th(deltas), max_shape=max_shape[1])
        unclipped = MMDeltaXYWHBBoxCoder().decode(th(anchors), th(deltas))
    assert_boxes_close(got, want, unclipped)
    if max_shape_kind in ("list", "tensor"):
        # Each image is clipped to its own shape, as single-image decoding does.
        for b in range(2):
            single = DeltaXYWHBBoxCoder().decode(pd(anchors[b]), pd(deltas[b]), max_shape=shapes[b])
            assert_boxes_close(got[b], single, unclipped[b])


# --------------------------------------------------------------------------- assigner


def mm_assign(kwargs, anchors, gts, labels, ignore=None):
    ref = MMMaxIoUAssigner(**{"pos_iou_thr": 0.5, "neg_iou_thr": 0.4, **kwargs})
    pred = InstanceData(priors=th(anchors.reshape(-1, 4)))
    gt = InstanceData(bboxes=th(gts.reshape(-1, 4)), labels=th(labels, torch.long))
    gt_ignore = None if ignore is None else InstanceData(bboxes=th(ignore.reshape(-1, 4)))
    res = ref.assign(pred, gt, gt_ignore)
    return npy(res.gt_inds), npy(res.max_overlaps), npy(res.labels), res.num_gts


def our_assign(kwargs, anchors, gts, labels, ignore=None):
    res = MaxIoUAssigner(**kwargs).assign(
        pd(anchors.reshape(-1, 4)),
        pd(gts.reshape(-1, 4)),
        pd(labels, "int64"),
        None if ignore is None else pd(ignore.reshape(-1, 4)),
    )
    assert res.gt_inds.dtype == paddle.int64 and res.labels.dtype == paddle.int64
    return npy(res.gt_inds), npy(res.max_overlaps), npy(res.labels), res.num_gts


def assert_same_assignment(kwargs, anchors, gts, labels, ignore=None):
    got = our_assign(kwargs, anchors, gts, labels, ignore)
    want = mm_assign(kwargs, anchors, gts, labels, ignore)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=ATOL)
    np.testing.assert_array_equal(got[2], want[2])
    assert got[3] == want[3]
    return got


@pytest.fixture(scope="module")
def small_anchors(generators):
    ours, _ = generators
    return np.concatenate([npy(a) for a in ours.grid_anchors(featmap_sizes(96, 128))])


def test_assign_no_gt_and_no_anchors(small_anchors):
    no_gts = np.zeros((0, 4), np.float32)
    gt_inds, max_overlaps, labels, _ = assert_same_assignment(
        {}, small_anchors, no_gts, np.zeros(0)
    )
    assert (gt_inds == 0).all() and (labels == -1).all() and (max_overlaps == 0).all()
    gts = np.array([[0, 0, 10, 10]], np.float32)
    gt_inds, *_ = assert_same_assignment({}, np.zeros((0, 4), np.float32), gts, np.array([3]))
    assert gt_inds.shape == (0,)


def test_assign_one_and_many_gts(small_anchors):
    rng = np.random.default_rng(1)
    for num_gts in (1, 2, 7, 30):
        gts = random_boxes(rng, num_gts, 96, 128, min_size=4)
        labels = rng.integers(0, 80, num_gts)
        gt_inds, _, labels_out, _ = assert_same_assignment({}, small_anchors, gts, labels)
        assert (gt_inds > 0).any()
        np.testing.assert_array_equal(labels_out[gt_inds > 0], labels[gt_inds[gt_inds > 0] - 1])


def test_assign_degenerate_duplicate_and_far_gts(small_anchors):
    rng = np.random.default_rng(2)
    gts = np.concatenate(
        [
            random_boxes(rng, 4, 96, 128, min_size=8),
            np.array([[30, 30, 30, 50], [40, 40, 40, 40]], np.float32),  # zero area: best IoU 0
            np.array([[500, 500, 520, 530]], np.float32),  # far outside: best IoU 0
        ]
    )
    gts = np.concatenate([gts, gts[1:2], gts[3:4]])  # duplicates: the later copy wins
    labels = np.arange(len(gts)) + 10
    for kwargs in ({}, {"min_pos_iou": 0.1}, {"gt_max_assign_all": False}):
        assert_same_assignment(kwargs, small_anchors, gts, labels)
    # The later copies take over the best anchors of the earlier ones.
    gt_inds, *_ = our_assign({}, small_anchors, gts, labels)
    assert (gt_inds == 8).any() and (gt_inds == 9).any()
    # A zero-area gt after the others claims every anchor at IoU 0, as mmdet's loop does.
    gt_inds, *_ = assert_same_assignment({}, small_anchors, gts[[0, 4]], labels[:2])
    assert (gt_inds == 2).sum() > len(small_anchors) // 2


def test_assign_thresholds_ties_and_min_pos_iou():
    # IoUs 50/100, 40/100, 70/100 and 30/100 with the 10 x 10 anchors. float32(0.7)
    # lies below 0.7, so the 0.7 case also checks that thresholds compare in
    # float32, as torch does, and not in double.
    anchors = np.array(
        [
            [0, 0, 10, 10],
            [0, 0, 10, 5],
            [0, 5, 10, 10],
            [100, 100, 110, 110],
            [200, 200, 210, 210],
            [300, 300, 310, 310],
            [400, 400, 410, 410],
            [100, 100, 110, 104],
            [200, 200, 210, 207],
            [300, 300, 310, 303],
        ],
        np.float32,
    )
    gts = np.array(
        [
            [0, 0, 10, 5],
            [0, 5, 10, 10],  # ties with the first gt on anchor 0 (both IoU 0.5)
            [100, 100, 110, 104],  # IoU 0.4 with anchor 3
            [200, 200, 210, 207],  # IoU 0.7 with anchor 4
            [300, 300, 310, 303],  # IoU 0.3 with anchor 5
            [400, 400, 402, 402],  # best IoU 0.04: below a min_pos_iou of 0.3
        ],
        np.float32,
    )
    labels = np.array([5, 6, 7, 8, 9, 11])
    for kwargs in (
        {},
        {"pos_iou_thr": 0.7, "neg_iou_thr": 0.3},
        {"pos_iou_thr": 0.4, "neg_iou_thr": 0.3, "min_pos_iou": 0.3},
        {"pos_iou_thr": 0.5, "neg_iou_thr": (0.3, 0.4), "match_low_quality": False},
        {"pos_iou_thr": 0.7, "neg_iou_thr": 0.7, "match_low_quality": False},
        {"min_pos_iou": 0.3, "gt_max_assign_all": False},
    ):
        assert_same_assignment(kwargs, anchors, gts, labels)
    # Without low-quality matches anchor 0 is positive for the first of its tied gts.
    gt_inds, *_ = our_assign({"match_low_quality": False}, anchors, gts, labels)
    assert gt_inds[0] == 1 and gt_inds[3] == -1
    # Exactly 0.7 is positive at pos_iou_thr 0.7; exactly 0.3 is not negative at 0.3.
    strict = {"pos_iou_thr": 0.7, "neg_iou_thr": 0.3, "match_low_quality": False}
    gt_inds, *_ = our_assign(strict, anchors, gts, labels)
    assert gt_inds[4] == 4 and gt_inds[5] == -1
    # The gt below min_pos_iou keeps its anchor unmatched.
    gt_inds, *_ = our_assign({"min_pos_iou": 0.3}, anchors, gts, labels)
    assert gt_inds[6] == 0


def test_assign_with_ignore_regions(small_anchors):
    rng = np.random.default_rng(4)
    gts = random_boxes(rng, 5, 96, 128, min_size=8)
    ignore = random_boxes(rng, 3, 96, 128, min_size=16)
    labels = rng.integers(0, 80, 5)
    for kwargs in (
        {"ignore_iof_thr": 0.5},
        {"ignore_iof_thr": 0.3, "ignore_wrt_candidates": False},
    ):
        gt_inds, *_ = assert_same_assignment(kwargs, small_anchors, gts, labels, ignore)
        assert (gt_inds == -1).any()
    assert_same_assignment({"ignore_iof_thr": 0.5}, small_anchors, gts[:0], labels[:0], ignore)


@FEW
@given(
    seed=st.integers(0, 2**16),
    num_gts=st.integers(0, 12),
    kwargs=st.sampled_from(
        [
            {},
            {"pos_iou_thr": 0.6, "neg_iou_thr": 0.3, "min_pos_iou": 0.2},
            {"gt_max_assign_all": False},
            {"match_low_quality": False},
        ]
    ),
)
def test_assign_random_equals_mmdet(small_anchors, seed, num_gts, kwargs):
    rng = np.random.default_rng(seed)
    # Coordinates on a 4-pixel grid make exact IoU ties between anchors and between gts likely.
    gts = np.round(random_boxes(rng, num_gts, 96, 128, min_size=2) / 4) * 4
    if num_gts > 2:
        gts[rng.integers(0, num_gts)] = gts[0]
    labels = rng.integers(0, 80, num_gts)
    assert_same_assignment(kwargs, small_anchors, gts.astype(np.float32), labels)


# --------------------------------------------------------------------------- batched assigner


@pytest.mark.parametrize("gt_form", ["counts", "mask"])
@pytest.mark.parametrize("use_valid", ["none", "flags", "random"])
@pytest.mark.parametrize(
    "kwargs", [{}, {"gt_max_assign_all": False}, {"min_pos_iou": 0.2, "neg_iou_thr": (0.1, 0.4)}]
)
def test_assign_batch_equals_per_image_and_mmdet(generators, gt_form, use_valid, kwargs):
    ours, _ = generators
    batch_shape = (96, 128)
    sizes = featmap_sizes(*batch_shape)
    anchors = np.concatenate([npy(a) for a in ours.grid_anchors(sizes)])
    pad_shapes = [(96, 128), (64, 96), (96, 64), (32, 32)]
    rng = np.random.default_rng(5)
    counts = [5, 0, 1, 3]
    max_gts = 6
    gts = np.zeros((4, max_gts, 4), np.float32)
    labels = np.full((4, max_gts), 99, np.int64)
    mask = np.zeros((4, max_gts), bool)
    for b, n in enumerate(counts):
        h, w = pad_shapes[b]
        boxes = np.round(random_boxes(rng, n, h, w, min_size=4) / 4) * 4
        if b == 0:
            boxes[3] = boxes[1]  # duplicate: the later copy wins
            boxes[4] = [8, 8, 8, 20]  # zero area
        if b == 3:
            # Straddles the 32 x 32 padded extent: its best anchor overall is
            # invalid, so its low-quality match must come from the valid ones.
            boxes[0] = [20, 20, 60, 60]
        if gt_form == "counts":
            slots = np.arange(n)
        else:
            slots = np.sort(rng.choice(max_gts, n, replace=False))
        gts[b, slots] = boxes
        labels[b, slots] = rng.integers(0, 80, n)
        mask[b, slots] = True
        # Padding slots hold boxes that would win if they were not masked out.
        gts[b, ~mask[b]] = anchors[rng.integers(0, len(anchors), max_gts - n)]
    valid = np.stack(
        [np.concatenate([npy(f) for f in ours.valid_flags(sizes, shape)]) for shape in pad_shapes]
    )
    if use_valid == "none":
        valid[:] = True
    elif use_valid == "random":
        # Any mask works, e.g. one that also drops anchors in ignore regions;
        # without anchor 0 the first anchor at a zero best IoU is another one.
        valid = rng.random(valid.shape) < 0.7
        valid[:, 0] = False

    assigner = MaxIoUAssigner(**kwargs)
    result = assigner.assign_batch(
        pd(anchors),
        pd(gts),
        pd(counts, "int64") if gt_form == "counts" else pd(mask, "bool"),
        pd(labels, "int64"),
        valid=None if use_valid == "none" else pd(valid, "bool"),
    )
    assert tuple(result.gt_inds.shape) == (4, len(anchors)) and result.gt_inds.dtype == paddle.int64
    np.testing.assert_array_equal(npy(result.num_gts), counts)
    gt_inds, max_overlaps = npy(result.gt_inds), npy(result.max_overlaps)
    labels_out = npy(result.labels)

    for b in range(4):
        slots = np.flatnonzero(mask[b])
        # Batched indices point at padded slots; per-image ones at the compacted list.
        to_rank = np.full(max_gts + 1, -2)
        to_rank[0], to_rank[slots + 1] = 0, np.arange(1, len(slots) + 1)
        ranked = np.where(gt_inds[b] > 0, to_rank[np.maximum(gt_inds[b], 0)], gt_inds[b])
        v = valid[b]
        want = mm_assign(kwargs, anchors[v], gts[b, slots], labels[b, slots])
        mine = our_assign(kwargs, anchors[v], gts[b, slots], labels[b, slots])
        for reference in (want, mine):
            np.testing.assert_array_equal(ranked[v], reference[0])
            np.testing.assert_allclose(max_overlaps[b, v], reference[1], rtol=0, atol=ATOL)
            np.testing.assert_array_equal(labels_out[b, v], reference[2])
        assert (gt_inds[b, ~v] == -1).all() and (labels_out[b, ~v] == -1).all()
        assert (max_overlaps[b, ~v] == 0).all()
    assert valid.all() == (use_valid == "none")


def test_assign_batch_all_images_without_gts(small_anchors):
    result = MaxIoUAssigner().assign_batch(
        pd(small_anchors),
        pd(np.zeros((2, 0, 4))),
        pd([0, 0], "int64"),
        pd(np.zeros((2, 0)), "int64"),
    )
    assert (npy(result.gt_inds) == 0).all() and (npy(result.labels) == -1).all()
    assert tuple(result.gt_inds.shape) == (2, len(small_anchors))


def test_from_config_defaults():
    cfg = get_config()
    assigner = MaxIoUAssigner.from_config()
    assert assigner.pos_iou_thr == cfg["train_cfg"]["assigner"]["pos_iou_thr"]
    assert assigner.neg_iou_range == (0.0, cfg["train_cfg"]["assigner"]["neg_iou_thr"])
    coder = DeltaXYWHBBoxCoder.from_config()
    assert coder.stds == cfg["bbox_head"]["bbox_coder"]["target_stds"]
    assert AnchorGenerator.from_config().strides == GEN_CFG["strides"]
