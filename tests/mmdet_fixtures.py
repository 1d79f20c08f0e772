"""Shared helpers for tests that build mmdet's reference pieces."""
from __future__ import annotations

import numpy as np


def mmdet_model_cfg():
    """The reference model config, read from the file mmdet ships."""
    from torch_ref.reference import load_config

    return load_config().model


def build_mmdet(cfg):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from torch_ref.reference import quiet_mmengine

    register_all_modules(init_default_scope=True)
    quiet_mmengine()
    module = MODELS.build(cfg)
    module.init_weights()
    return module


def port_weights(torch_module, paddle_layer) -> None:
    """Copy a torch module's weights into the mirrored Paddle layer, strictly."""
    from weights_convert.convert import convert_state_dict

    shapes = {k: tuple(v.shape) for k, v in paddle_layer.state_dict().items()}
    paddle_layer.set_state_dict(convert_state_dict(torch_module.state_dict(), shapes))


def seeded(shape, seed=0, scale=1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def build_mmdet_head():
    """mmdet's RetinaHead with the model's train and test configs, as RetinaNet builds it."""
    cfg = mmdet_model_cfg()
    head_cfg = cfg.bbox_head.copy()
    head_cfg.update(train_cfg=cfg.train_cfg, test_cfg=cfg.test_cfg)
    return build_mmdet(head_cfg)
