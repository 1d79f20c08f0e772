"""The COCO 2017 layout under a root folder: ``annotations/instances_{train,val}2017.json`` and the
image folders ``train2017/`` and ``val2017/`` (what ``--coco`` and ``COCO=`` point at)."""
from __future__ import annotations

import os
from pathlib import Path

from common.errors import InputError


def coco_paths(root: str | os.PathLike) -> dict[str, str]:
    """The four COCO inputs under ``root``; raises :class:`InputError` naming the first one missing."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--coco {root}: folder not found")
    paths = {
        "train_ann": root / "annotations" / "instances_train2017.json",
        "val_ann": root / "annotations" / "instances_val2017.json",
        "train_img": root / "train2017",
        "val_img": root / "val2017",
    }
    for key, path in paths.items():
        exists = path.is_file() if key.endswith("ann") else path.is_dir()
        if not exists:
            kind = "annotation file" if key.endswith("ann") else "image folder"
            raise InputError(f"--coco {root}: {kind} not found: {path}")
    return {k: str(v) for k, v in paths.items()}
