"""Both data sides on the same tiny COCO: mmdet's own dataset and preprocessor, and ours.

Shared by the data, predict, metric and train stages. mmdet's pieces are built
from the GHM config mmdet ships (``torch_ref.reference.load_config``), pointed
at a tiny COCO generated into the build folder; only the data root, the
``Resize`` scale and the ``RandomFlip`` probability are overridden, and the
same overrides go to our ``CocoDetection``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

TRAIN_SPLIT = "train2017"
VAL_SPLIT = "val2017"
TINY_TRAIN_IMAGES = 8
TINY_VAL_IMAGES = 4


def tiny_coco_root(build_dir: Path, seed: int) -> Path:
    """The seeded tiny COCO (8 train, 4 val images) under ``build_dir``, generated once.

    ``tiny_coco.generate`` moves a complete folder into place in one rename, so
    an existing folder is a finished one.
    """
    from paddle_impl.data import tiny_coco

    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    root = Path(build_dir) / "tiny_coco" / f"seed{seed}"
    if not (root / "annotations" / f"instances_{VAL_SPLIT}.json").is_file():
        try:
            tiny_coco.generate(root, train=TINY_TRAIN_IMAGES, val=TINY_VAL_IMAGES, seed=seed)
        except FileExistsError:
            # Another process finished the same folder first; it holds the same bytes.
            pass
    return root


def ann_file(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{split}.json"


def mmdet_setup() -> Any:
    """Register mmdet's modules and return its GHM config (pretrained init off)."""
    from mmdet.utils import register_all_modules

    from torch_ref.reference import load_config, quiet_mmengine

    register_all_modules(init_default_scope=True)
    quiet_mmengine()
    return load_config()


def mmdet_dataset(cfg, root: Path, train: bool, scale: Sequence[int], flip_prob: float = 0.0):
    """mmdet's ``CocoDataset`` of the config's train or val loader on ``root``.

    The pipeline is the config's, with ``Resize.scale = scale`` and (training)
    ``RandomFlip.prob = flip_prob``: 1.0 or 0.0 force the flip.
    """
    from mmdet.registry import DATASETS

    ds_cfg = copy.deepcopy(cfg.train_dataloader.dataset if train else cfg.val_dataloader.dataset)
    split = TRAIN_SPLIT if train else VAL_SPLIT
    ds_cfg.data_root = str(root)
    ds_cfg.ann_file = f"annotations/instances_{split}.json"
    ds_cfg.data_prefix = dict(img=f"{split}/")
    for step in ds_cfg.pipeline:
        if step["type"] == "Resize":
            step["scale"] = tuple(scale)
        elif step["type"] == "RandomFlip":
            step["prob"] = flip_prob
    return DATASETS.build(ds_cfg)


def mmdet_preprocessor(cfg):
    """mmdet's ``DetDataPreprocessor`` of the config."""
    from mmdet.registry import MODELS

    return MODELS.build(cfg.model.data_preprocessor)


def mmdet_batch(samples: Sequence[dict]) -> dict:
    """mmengine's ``pseudo_collate`` of packed samples (what mmdet's loaders hand the model)."""
    from mmengine.dataset import pseudo_collate

    return pseudo_collate(list(samples))


def our_dataset(root: Path, train: bool, scale: Sequence[int], flip: bool | None = False, seed: int = 0):
    """Our ``CocoDetection`` on ``root`` with the same scale; ``flip`` forces (train) or draws (None)."""
    from paddle_impl.data.dataset import CocoDetection

    split = TRAIN_SPLIT if train else VAL_SPLIT
    return CocoDetection(ann_file(root, split), root / split, train=train,
                         flip=flip if train else None, seed=seed, scale=tuple(scale))
