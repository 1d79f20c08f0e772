"""The GHM RetinaNet configuration, as data.

Every value mirrors mmdet 3.3.0's ``configs/ghm/retinanet_r50_fpn_ghm-1x_coco.py``
and its bases (``retinanet_r50_fpn.py``, ``coco_detection.py``,
``schedule_1x.py``). Code reads these values; it does not repeat them.
"""
from __future__ import annotations

import copy
from typing import Any

GHM_RETINANET: dict[str, Any] = dict(
    data_preprocessor=dict(
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=32,
    ),
    backbone=dict(
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_eval=True,
        style="pytorch",
        bn_eps=1e-5,
        bn_momentum=0.1,  # torch convention; Paddle's momentum is 1 - this
    ),
    neck=dict(
        in_channels=[256, 512, 1024, 2048],
        out_channels=256,
        start_level=1,
        add_extra_convs="on_input",
        relu_before_extra_convs=False,
        num_outs=5,
    ),
    bbox_head=dict(
        num_classes=80,
        in_channels=256,
        stacked_convs=4,
        feat_channels=256,
        init_std=0.01,
        prior_prob=0.01,
        anchor_generator=dict(
            octave_base_scale=4,
            scales_per_octave=3,
            ratios=[0.5, 1.0, 2.0],
            strides=[8, 16, 32, 64, 128],
        ),
        bbox_coder=dict(
            target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=[1.0, 1.0, 1.0, 1.0],
        ),
        loss_cls=dict(bins=30, momentum=0.75, use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(mu=0.02, bins=10, momentum=0.7, loss_weight=10.0),
    ),
    train_cfg=dict(
        assigner=dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0, ignore_iof_thr=-1),
        allowed_border=-1,
        pos_weight=-1,
    ),
    test_cfg=dict(
        nms_pre=1000,
        min_bbox_size=0,
        score_thr=0.05,
        nms_iou_threshold=0.5,
        max_per_img=100,
    ),
    optimizer=dict(
        lr=0.01,
        base_batch_size=16,
        momentum=0.9,
        weight_decay=1e-4,
        clip_grad_max_norm=35.0,
        warmup_start_factor=0.001,
        warmup_iters=500,
        milestones=[8, 11],
        gamma=0.1,
        max_epochs=12,
    ),
    data=dict(
        scale=(1333, 800),
        flip_prob=0.5,
        filter_empty_gt=True,
        min_size=32,
        batch_size_per_device=2,
        num_workers=2,
        test_scale=(1333, 800),  # test pipeline's Resize (keep_ratio, no flip)
        test_batch_size=1,
        pad_value=0.0,  # DetDataPreprocessor's default, applied after normalisation
    ),
    runtime=dict(
        log_interval=50,  # mmdet's LoggerHook interval: iterations per training log line
    ),
    deploy=dict(
        opset_version=11,  # paddle2onnx's opset for the exported network (onnxruntime matches it within 2e-6)
        # paddle.jit.save's file prefix inside an export folder: <prefix>.json, <prefix>.pdiparams
        model_prefix="model",
        onnx_file="model.onnx",
        spec_file="deploy.json",  # preprocessing, outputs and provenance of the export
    ),
)


def get_config() -> dict[str, Any]:
    """A deep copy of the reference configuration, safe to modify."""
    return copy.deepcopy(GHM_RETINANET)
