"""A tiny synthetic COCO: seeded images of coloured shapes with real COCO annotations.

``python -m paddle_impl.data.tiny_coco OUT_DIR [--train 8 --val 4 --seed 0 --size 320x480]``
writes::

    OUT_DIR/train2017/000000000001.png ...
    OUT_DIR/val2017/000000100001.png ...
    OUT_DIR/annotations/instances_train2017.json
    OUT_DIR/annotations/instances_val2017.json

Images are lossless PNG, so every decoder yields the drawn pixels. Each object
is a filled rectangle or ellipse whose category fixes its shape, proportions
and colour (person, car, dog, bottle, tv), on a textured grey background, so a
detector can overfit them. The json files are COCO instances files: all 80
COCO categories with their real ids (so mmdet's label of ``dog``, id 18, is
16), boxes ``[x, y, w, h]``, ``area``, ``iscrowd`` and the shape's polygon as
``segmentation`` (crowds: uncompressed RLE of the union of their members).

The first images of each split play fixed roles, chosen to exercise mmdet's
rules (``--size HxW`` is the landscape base size; portraits swap it):

train: 1 landscape, several objects; 2 portrait, several objects; 3 a crowd
(``iscrowd=1``) beside two objects; 4 portrait with a tiny (< 32 px) object;
5 only a crowd (mmdet keeps it: its filter counts crowd annotations, yet no box
is trained on); 6 no annotation (dropped by ``filter_empty_gt``); 7 a strip
24 px high (dropped by ``min_size=32``); 8 square (grouped with landscapes).
val: 1 landscape, several objects; 2 portrait, several objects; 3 square with a
tiny object; 4 no annotation (a test set keeps it).
Further images are random mixes. With fewer images than roles, the first roles
are used. Output is a pure function of the arguments: same seed, same bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from common.arguments import non_negative, parse_size, positive
from paddle_impl.data.coco_classes import COCO_CATEGORY_IDS, COCO_CLASSES

# COCO's supercategories, as contiguous runs of COCO_CLASSES.
_SUPERCATEGORY_RUNS = (
    ("person", 1), ("vehicle", 8), ("outdoor", 5), ("animal", 10), ("accessory", 5),
    ("sports", 10), ("kitchen", 7), ("food", 10), ("furniture", 6), ("electronic", 6),
    ("appliance", 5), ("indoor", 7),
)


@dataclass(frozen=True)
class Style:
    """How a category is drawn: ``kind`` rectangle or ellipse, ``aspect`` height / width,
    ``colour`` BGR."""

    kind: str
    aspect: float
    colour: tuple[int, int, int]


STYLES: dict[str, Style] = {
    "person": Style("ellipse", 2.2, (60, 20, 220)),
    "car": Style("rectangle", 0.5, (200, 80, 0)),
    "dog": Style("ellipse", 0.7, (0, 160, 255)),
    "bottle": Style("rectangle", 2.8, (40, 200, 40)),
    "tv": Style("rectangle", 0.75, (200, 40, 200)),
}

TRAIN_ROLES = ("multi", "multi_portrait", "crowd", "tiny_portrait", "crowd_only", "empty", "strip", "square")
VAL_ROLES = ("multi", "multi_portrait", "tiny_square", "empty")
# Ids are unique across the splits, as in COCO.
FIRST_ID = {"train2017": 1, "val2017": 100001}
SPLIT_SEED = {"train2017": 0, "val2017": 1}


def categories() -> list[dict[str, Any]]:
    """COCO's 80 categories in COCO's order, with their real ids and supercategories."""
    supercategories = [name for name, count in _SUPERCATEGORY_RUNS for _ in range(count)]
    return [{"id": cat_id, "name": name, "supercategory": sup}
            for cat_id, name, sup in zip(COCO_CATEGORY_IDS, COCO_CLASSES, supercategories)]


@dataclass
class Canvas:
    """One image being drawn: pixels ``(H, W, 3)`` uint8 BGR, its annotations, occupied boxes."""

    image: np.ndarray
    annotations: list[dict[str, Any]] = field(default_factory=list)
    occupied: list[tuple[float, float, float, float]] = field(default_factory=list)

    @property
    def height(self) -> int:
        return self.image.shape[0]

    @property
    def width(self) -> int:
        return self.image.shape[1]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A muted grey with a gentle gradient and pixel noise: texture, not objects."""
    base = rng.integers(100, 160, size=3)
    ramp_y = np.linspace(-15, 15, height)[:, None, None] * rng.uniform(-1, 1)
    ramp_x = np.linspace(-15, 15, width)[None, :, None] * rng.uniform(-1, 1)
    noise = rng.integers(-12, 13, size=(height, width, 3))
    return np.clip(base + ramp_y + ramp_x + noise, 0, 255).astype(np.uint8)


def _polygon(style: Style, cx: float, cy: float, w: float, h: float) -> np.ndarray:
    """Outline ``(K, 2)`` of a shape centred at ``(cx, cy)`` with extent ``w x h``."""
    if style.kind == "rectangle":
        x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    angles = np.arange(24) * (2 * np.pi / 24)
    return np.stack([cx + w / 2 * np.cos(angles), cy + h / 2 * np.sin(angles)], axis=1)


def _fill(target: np.ndarray, polygon: np.ndarray, value) -> None:
    # 4 fractional bits: shapes sit at sub-pixel positions, as COCO polygons do.
    cv2.fillPoly(target, [np.round(polygon * 16).astype(np.int32)], value, lineType=cv2.LINE_8, shift=4)


def _free(canvas: Canvas, box: tuple[float, float, float, float], margin: float = 3.0) -> bool:
    x0, y0, x1, y1 = box
    return all(x1 + margin <= a0 or a1 + margin <= x0 or y1 + margin <= b0 or b1 + margin <= y0
               for a0, b0, a1, b1 in canvas.occupied)


def _place(rng: np.random.Generator, canvas: Canvas, w: float, h: float) -> tuple[float, float] | None:
    """A centre where a ``w x h`` box fits inside the image without touching others."""
    if w + 4 > canvas.width or h + 4 > canvas.height:
        return None
    for _ in range(100):
        cx = rng.uniform(w / 2 + 2, canvas.width - w / 2 - 2)
        cy = rng.uniform(h / 2 + 2, canvas.height - h / 2 - 2)
        if _free(canvas, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)):
            return cx, cy
    return None


def _category_id(name: str) -> int:
    return COCO_CATEGORY_IDS[COCO_CLASSES.index(name)]


def _round(values) -> list[float]:
    return [round(float(v), 2) for v in values]


def add_object(rng: np.random.Generator, canvas: Canvas, name: str, size: float) -> bool:
    """Draw one ``name`` of geometric-mean extent ``size`` px and annotate it; False if it did not fit."""
    style = STYLES[name]
    w, h = size / np.sqrt(style.aspect), size * np.sqrt(style.aspect)
    centre = _place(rng, canvas, w, h)
    if centre is None:
        return False
    polygon = _polygon(style, centre[0], centre[1], w, h)
    _fill(canvas.image, polygon, style.colour)
    x0, y0 = polygon.min(axis=0)
    x1, y1 = polygon.max(axis=0)
    canvas.occupied.append((x0, y0, x1, y1))
    xs, ys = polygon[:, 0], polygon[:, 1]
    area = 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))
    canvas.annotations.append({
        "category_id": _category_id(name),
        "bbox": _round([x0, y0, x1 - x0, y1 - y0]),
        "area": round(float(area), 2),
        "iscrowd": 0,
        "segmentation": [_round(polygon.reshape(-1))],
    })
    return True


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE of a ``(H, W)`` 0/1 mask: run lengths over the
    column-major pixels, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], starts, [flat.size]])).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def add_crowd(rng: np.random.Generator, canvas: Canvas, members: int = 6) -> bool:
    """A cluster of small people annotated as one ``iscrowd=1`` region."""
    region_w, region_h = 0.4 * canvas.width, 0.45 * canvas.height
    centre = _place(rng, canvas, region_w, region_h)
    if centre is None:
        return False
    style = STYLES["person"]
    mask = np.zeros((canvas.height, canvas.width), np.uint8)
    left, top = centre[0] - region_w / 2, centre[1] - region_h / 2
    for _ in range(members):
        size = rng.uniform(0.18, 0.3) * min(region_w, region_h)
        w, h = size / np.sqrt(style.aspect), size * np.sqrt(style.aspect)
        cx = left + rng.uniform(w / 2, region_w - w / 2)
        cy = top + rng.uniform(h / 2, region_h - h / 2)
        _fill(mask, _polygon(style, cx, cy, w, h), 1)
    canvas.image[mask == 1] = style.colour
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    x0, y0 = int(cols[0]), int(rows[0])
    canvas.occupied.append((left, top, left + region_w, top + region_h))
    canvas.annotations.append({
        "category_id": _category_id("person"),
        "bbox": [x0, y0, int(cols[-1]) + 1 - x0, int(rows[-1]) + 1 - y0],
        "area": int(mask.sum()),
        "iscrowd": 1,
        "segmentation": _uncompressed_rle(mask),
    })
    return True


def _random_objects(rng: np.random.Generator, canvas: Canvas, count: int) -> None:
    names = sorted(STYLES)
    short = min(canvas.height, canvas.width)
    for _ in range(count):
        add_object(rng, canvas, names[rng.integers(len(names))], rng.uniform(0.18, 0.4) * short)


def _image_size(rng: np.random.Generator, role: str, base_h: int, base_w: int) -> tuple[int, int]:
    """``(height, width)`` of an image of ``role`` around the landscape base size."""
    h = int(round(base_h * rng.uniform(0.75, 1.0)))
    w = int(round(base_w * rng.uniform(0.75, 1.0)))
    if role == "strip":
        return 24, w
    if role in ("square", "tiny_square"):
        return h, h
    if role.endswith("portrait") or (role == "random" and rng.random() < 0.5):
        return w, h
    return h, w


def draw_image(rng: np.random.Generator, role: str, base_h: int, base_w: int) -> Canvas:
    """One image playing ``role`` (see the module docstring)."""
    height, width = _image_size(rng, role, base_h, base_w)
    canvas = Canvas(_background(rng, height, width))
    if role in ("multi", "multi_portrait", "square"):
        _random_objects(rng, canvas, int(rng.integers(3, 5)))
    elif role == "crowd":
        add_crowd(rng, canvas)
        _random_objects(rng, canvas, 2)
    elif role == "crowd_only":
        add_crowd(rng, canvas)
    elif role in ("tiny_portrait", "tiny_square"):
        add_object(rng, canvas, "car", rng.uniform(12, 18))
        _random_objects(rng, canvas, 2)
    elif role == "strip":
        add_object(rng, canvas, "car", 16)
    elif role == "random":
        _random_objects(rng, canvas, int(rng.integers(1, 4)))
    elif role != "empty":
        raise ValueError(f"unknown image role {role!r}")
    return canvas


def build_split(split: str, count: int, seed: int, base_h: int, base_w: int,
                image_dir: Path) -> dict[str, Any]:
    """Draw ``count`` images into ``image_dir`` and return the split's instances json."""
    roles = TRAIN_ROLES if split == "train2017" else VAL_ROLES
    images, annotations = [], []
    for i in range(count):
        role = roles[i] if i < len(roles) else "random"
        # One generator per image: an image does not change when the count does.
        rng = np.random.default_rng([seed, SPLIT_SEED[split], i])
        canvas = draw_image(rng, role, base_h, base_w)
        img_id = FIRST_ID[split] + i
        file_name = f"{img_id:012d}.png"
        ok, encoded = cv2.imencode(".png", canvas.image)
        if not ok:
            raise RuntimeError(f"OpenCV could not encode image {img_id} as PNG")
        (image_dir / file_name).write_bytes(encoded.tobytes())
        images.append({"id": img_id, "file_name": file_name, "height": canvas.height, "width": canvas.width})
        for ann in canvas.annotations:
            annotations.append({"id": len(annotations) + FIRST_ID[split], "image_id": img_id, **ann})
    return {
        "info": {"description": f"synthetic tiny COCO ({split}, seed {seed})", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories(),
    }


def generate(out_dir: str | os.PathLike, train: int = 8, val: int = 4, seed: int = 0,
             size: Sequence[int] = (320, 480), overwrite: bool = False) -> Path:
    """Write the tiny COCO to ``out_dir`` and return it.

    Args:
        train, val: number of images per split (>= 1).
        seed: non-negative; the output is a pure function of all arguments.
        size: ``(height, width)`` of the landscape base size, each >= 64.
        overwrite: replace an existing non-empty ``out_dir``.

    Everything is written to a temporary sibling folder first and moved into
    place at the end, so ``out_dir`` is either complete or untouched.
    """
    out_dir = Path(out_dir)
    base_h, base_w = (int(v) for v in size)
    if train < 1 or val < 1:
        raise ValueError(f"need at least one image per split, got train={train}, val={val}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if min(base_h, base_w) < 64:
        raise ValueError(f"size {base_w}x{base_h} (WxH) is too small: both sides must be >= 64")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not an empty folder (pass overwrite=True / --force)")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        (staging / "annotations").mkdir()
        for split, count in (("train2017", train), ("val2017", val)):
            (staging / split).mkdir()
            instances = build_split(split, count, seed, base_h, base_w, staging / split)
            (staging / "annotations" / f"instances_{split}.json").write_text(
                json.dumps(instances, separators=(",", ":")))
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            os.replace(out_dir, old / "previous")
            os.replace(staging, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def _base_size(text: str) -> tuple[int, int]:
    """``--size WxH`` -> ``(h, w)``, the order `generate` takes."""
    w, h = parse_size(text, minimum=1)
    return h, w


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paddle_impl.data.tiny_coco",
                                     description="Write a seeded synthetic COCO instances dataset.")
    parser.add_argument("out_dir", help="folder to create (must not exist, or be empty)")
    parser.add_argument("--train", type=positive, default=8, help="training images (default 8)")
    parser.add_argument("--val", type=positive, default=4, help="validation images (default 4)")
    parser.add_argument("--seed", type=non_negative, default=0, help="seed (default 0)")
    parser.add_argument("--size", type=_base_size, default=(320, 480),
                        help="landscape base size WxH (default 480x320)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty out_dir")
    args = parser.parse_args(argv)
    try:
        out = generate(args.out_dir, args.train, args.val, args.seed, args.size, overwrite=args.force)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {args.train} train and {args.val} val images (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
