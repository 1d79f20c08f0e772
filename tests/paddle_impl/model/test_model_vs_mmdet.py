"""Paddle ResNet-50, FPN, RetinaHead and detector vs mmdet's, layer by layer."""
from __future__ import annotations

import math

import numpy as np
import paddle
import pytest
import torch

from align.engine.capture import PaddleComparer, TorchRecorder
from align.engine.compare import diff_arrays
from tests.mmdet_fixtures import build_mmdet, mmdet_model_cfg, port_weights, seeded
from paddle_impl.config import get_config
from paddle_impl.model.detector import RetinaNet
from paddle_impl.model.fpn import FPN
from paddle_impl.model.resnet import ResNet
from paddle_impl.model.retina_head import RetinaHead
from torch_ref.reference import randomize_statistics

# Whole stages, processes or the full-size model: `make test-fast` skips these.
pytestmark = pytest.mark.slow

TOL = dict(rel_tol=1e-5, mean_tol=1e-5)


def aligned_run(torch_module, paddle_layer, torch_call, paddle_call):
    """Run both with layer capture; return (torch outputs, paddle outputs, layer rows)."""
    with torch.no_grad(), TorchRecorder(torch_module) as rec:
        t_out = torch_call()
    with paddle.no_grad(), PaddleComparer(paddle_layer, rec.records, **TOL) as cmp:
        p_out = paddle_call()
    # Same layers called in the same order, so a first divergence means the same on both sides.
    assert [r.name for r in cmp.rows] == list(rec.records)
    return t_out, p_out, cmp.rows


def assert_rows_pass(rows, expected_min):
    assert len(rows) >= expected_min
    failed = [(r.name, r.reason) for r in rows if not r.passed]
    assert not failed, failed[:5]


def test_resnet_matches_mmdet_layer_by_layer():
    torch.manual_seed(0)
    t = randomize_statistics(build_mmdet(mmdet_model_cfg().backbone), seed=1)
    t.eval()  # mmdet's ResNet.train returns None
    b = get_config()["backbone"]
    p = ResNet(depth=b["depth"], out_indices=b["out_indices"], frozen_stages=b["frozen_stages"])
    port_weights(t, p)
    p.eval()
    x = seeded((1, 3, 67, 93), seed=2)  # odd sizes exercise padding and ceil
    t_out, p_out, rows = aligned_run(t, p, lambda: t(torch.from_numpy(x)),
                                     lambda: p(paddle.to_tensor(x)))
    # stem 4 + per block (3 conv, 3 bn, 3 relu calls) + 4 downsample pairs
    assert_rows_pass(rows, 4 + 16 * 9 + 8)
    names = {r.name for r in rows}
    assert {"layer1.0.relu", "layer1.0.relu#2", "layer4.2.relu#2", "maxpool"} <= names
    for a, b_ in zip(t_out, p_out):
        d = diff_arrays("C", a.numpy(), b_.numpy(), **TOL)
        assert d.passed, d.reason
    assert [tuple(o.shape) for o in p_out] == [(1, 256, 17, 24), (1, 512, 9, 12),
                                              (1, 1024, 5, 6), (1, 2048, 3, 3)]


def test_fpn_matches_mmdet_with_non_integer_upsampling():
    torch.manual_seed(0)
    t = randomize_statistics(build_mmdet(mmdet_model_cfg().neck), seed=3)
    t.eval()  # mmdet's ResNet.train returns None
    n = get_config()["neck"]
    p = FPN(n["in_channels"], n["out_channels"], n["num_outs"], n["start_level"],
            n["add_extra_convs"], n["relu_before_extra_convs"])
    port_weights(t, p)
    # 19 -> 10 -> 5: the top-down path upsamples by non-integer factors.
    sizes = [(38, 37), (19, 19), (10, 10), (5, 5)]
    xs = [seeded((2, c, h, w), seed=i) for i, (c, (h, w)) in enumerate(zip(n["in_channels"], sizes))]
    t_out, p_out, rows = aligned_run(
        t, p, lambda: t([torch.from_numpy(v) for v in xs]),
        lambda: p([paddle.to_tensor(v) for v in xs]))
    assert_rows_pass(rows, 3 + 5)
    assert len(p_out) == 5
    for a, b_ in zip(t_out, p_out):
        d = diff_arrays("P", a.numpy(), b_.numpy(), **TOL)
        assert d.passed, d.reason


def test_fpn_has_no_relu_before_p7():
    n = get_config()["neck"]
    p = FPN(n["in_channels"], n["out_channels"], n["num_outs"], n["start_level"])
    # P7 must respond to negative P6 values: with a ReLU in between it could not.
    conv7 = p.fpn_convs[4].conv
    conv7.weight.set_value(np.zeros(conv7.weight.shape, np.float32))
    w = np.zeros(conv7.weight.shape, np.float32)
    w[:, :, 1, 1] = -np.eye(256, dtype=np.float32)
    conv7.weight.set_value(w)
    conv7.bias.set_value(np.zeros(256, np.float32))
    p6 = paddle.to_tensor(-np.ones((1, 256, 4, 4), np.float32))
    assert float(conv7(p6).min()) > 0.5


def test_retina_head_matches_mmdet_on_all_levels():
    torch.manual_seed(0)
    t = randomize_statistics(build_mmdet(mmdet_model_cfg().bbox_head), seed=4)
    t.eval()  # mmdet's ResNet.train returns None
    p = RetinaNet.from_config().bbox_head
    port_weights(t, p)
    feats = [seeded((2, 256, s, s + 1), seed=10 + s) for s in (12, 6, 3, 2, 1)]
    t_out, p_out, rows = aligned_run(
        t, p, lambda: t(tuple(torch.from_numpy(f) for f in feats)),
        lambda: p([paddle.to_tensor(f) for f in feats]))
    # (8 convs + 8 relus + 2 output convs) per level, the same layers called 5 times
    assert_rows_pass(rows, 18 * 5)
    names = {r.name for r in rows}
    assert {"retina_cls#4", "cls_convs.3.activate#4"} <= names and "retina_cls#5" not in names
    for kind in range(2):
        for a, b_ in zip(t_out[kind], p_out[kind]):
            assert a.shape == tuple(b_.shape)
            d = diff_arrays("head", a.numpy(), b_.numpy(), **TOL)
            assert d.passed, d.reason


def test_head_initialisation_follows_mmdet():
    h = get_config()["bbox_head"]
    p = RetinaHead(h["num_classes"], h["in_channels"], num_anchors=9)
    bias = p.retina_cls.bias.numpy()
    assert np.allclose(bias, -math.log((1 - 0.01) / 0.01))
    w = p.cls_convs[0].conv.weight.numpy()
    assert abs(w.std() - 0.01) < 1e-3 and abs(w.mean()) < 1e-3
    assert p.retina_cls.weight.shape == [9 * 80, 256, 3, 3]
    assert p.retina_reg.weight.shape == [9 * 4, 256, 3, 3]


def test_state_dict_names_mirror_mmdet():
    from weights_convert.convert import torch_key

    t = build_mmdet(mmdet_model_cfg())
    torch_keys = {k for k in t.state_dict() if not k.endswith("num_batches_tracked")}
    paddle_keys = {torch_key(k) for k in RetinaNet.from_config().state_dict()}
    assert paddle_keys == torch_keys


def test_trainable_parameters_and_norm_eval_match_mmdet():
    t = build_mmdet(mmdet_model_cfg())
    t.train()
    p = RetinaNet.from_config()
    p.train()
    t_trainable = {k for k, v in t.named_parameters() if v.requires_grad}
    p_trainable = {k for k, v in p.named_parameters() if not v.stop_gradient}
    assert p_trainable == t_trainable
    assert not any(k.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1."))
                   for k in p_trainable)
    t_bn_training = {k for k, m in t.named_modules()
                     if isinstance(m, torch.nn.BatchNorm2d) and m.training}
    p_bn_training = {k for k, m in p.named_sublayers()
                     if isinstance(m, paddle.nn.BatchNorm2D) and m.training}
    assert t_bn_training == p_bn_training == set()
    assert p.bbox_head.training and p.neck.training


def test_norm_eval_keeps_statistics_in_train_mode():
    p = RetinaNet.from_config()
    p.train()
    bn = p.backbone.layer3[0].bn1
    before = bn._mean.numpy().copy()
    p.backbone(paddle.to_tensor(seeded((1, 3, 64, 64), seed=5)))
    np.testing.assert_array_equal(before, bn._mean.numpy())


@pytest.mark.parametrize("size", [(64, 96), (33, 47)])
def test_whole_detector_matches_mmdet(size, tmp_path):
    torch.manual_seed(0)
    t = randomize_statistics(build_mmdet(mmdet_model_cfg()), seed=6)
    t.eval()  # mmdet's ResNet.train returns None
    p = RetinaNet.from_config()
    port_weights(t, p)
    p.eval()
    x = seeded((2, 3) + size, seed=7)
    with torch.no_grad():
        t_cls, t_reg = t.bbox_head(t.extract_feat(torch.from_numpy(x)))
    with paddle.no_grad():
        p_cls, p_reg = p(paddle.to_tensor(x))
    assert len(p_cls) == len(p_reg) == 5
    for a, b_ in zip(t_cls + t_reg, p_cls + p_reg):
        d = diff_arrays("out", a.numpy(), b_.numpy(), **TOL)
        assert d.passed, d.reason
