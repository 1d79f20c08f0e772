"""Detect objects in images with trained GHM RetinaNet weights; COCO results json and drawings.

Usage::

    python -m paddle_impl.predict --weights W.pdparams --images IMG [IMG ...] --out results.json
        [--ann-file instances.json --img-prefix DIR [--eval-backend pycocotools|faster-coco-eval]]
        [--draw-dir DIR] [--draw-thr 0.3] [--scale WxH]

``--weights``: model weights saved by ``paddle_impl.train`` (``epoch_E.pdparams``,
``model_final.pdparams``), a training checkpoint (``latest.ckpt``), or the
output of ``python -m weights_convert``.

Images go through mmdet's test pipeline (resize to fit ``--scale``, default
1333x800, keeping the ratio; normalise; pad to 32) one at a time, and the
detections (score > 0.05, class-wise NMS 0.5, at most 100) are mapped back to
original pixels. Image ids and category ids of the results json:

- with ``--ann-file`` and ``--img-prefix``: the images are that file's (all of
  them, or those whose ``file_name`` or path is among ``--images``), with their
  ids; categories are the file's ids of the 80 COCO classes; the 12 COCO box
  metrics are printed and written to ``OUT`` with ``.metrics.json`` in place of
  ``.json`` (computed by ``--eval-backend``: pycocotools, or faster-coco-eval
  with identical numbers);
- otherwise: image ids 1, 2, ... in the order of ``--images``; categories are
  COCO's ids (``paddle_impl.data.coco_classes.COCO_CATEGORY_IDS``).

``--draw-dir`` gets one PNG per image (``<stem>.png``) with the boxes scoring at
least ``--draw-thr``, labelled with the COCO class name and score.
Exit status 0, or 2 on bad input (the message names the file); the results json
is written atomically, and only after every image was processed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from paddle_impl.data.coco_classes import COCO_CATEGORY_IDS, COCO_CLASSES  # noqa: E402
from common.atomic_write import atomic_write, write_json  # noqa: E402
from paddle_impl.evaluation.coco_eval import detections_to_coco_json, evaluate_bbox  # noqa: E402
from paddle_impl.config import get_config  # noqa: E402
from paddle_impl.model.detector import RetinaNet  # noqa: E402
from paddle_impl.boxes.postprocess import Detections  # noqa: E402
from paddle_impl.engine.weights import convert_torch_checkpoint, load_weights, load_weights_file  # noqa: E402
from common.errors import InputError  # noqa: E402
from paddle_impl.errors import run_command  # noqa: E402
from paddle_impl.arguments import add_eval_backend, eval_backend  # noqa: E402
from common.arguments import fraction, parse_size  # noqa: E402
from paddle_impl.data.transforms import Collate, load_image, test_pipeline  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m paddle_impl.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help=".pdparams weights or a training checkpoint")
    p.add_argument("--images", nargs="+", default=[], help="image files (with --ann-file: a subset)")
    p.add_argument("--ann-file", help="COCO instances json giving image ids (and ground truth to evaluate)")
    p.add_argument("--img-prefix", help="folder of the --ann-file images")
    p.add_argument("--out", required=True, help="COCO results json to write")
    p.add_argument("--draw-dir", help="write one PNG per image with the boxes drawn")
    p.add_argument("--draw-thr", type=fraction, default=0.3, help="lowest score drawn (default 0.3)")
    p.add_argument("--scale", type=parse_size, help="test resize scale WxH (default 1333x800)")
    add_eval_backend(p)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="with an error, also print its Python traceback (or set GHM_TRACEBACK=1)")
    return p.parse_args(argv)


def select_images(args: argparse.Namespace) -> tuple[list[tuple[int, str]], list[int], str | None]:
    """``[(image_id, path)]``, the category id of each label, and the annotation file (or None)."""
    if bool(args.ann_file) != bool(args.img_prefix):
        raise InputError("--ann-file and --img-prefix go together")
    if not args.ann_file:
        if not args.images:
            raise InputError("give --images, or --ann-file with --img-prefix")
        for path in args.images:
            if not Path(path).is_file():
                raise InputError(f"--images: file not found: {path}")
        return list(enumerate(args.images, 1)), list(COCO_CATEGORY_IDS), None
    from paddle_impl.data.dataset import CocoDetection
    if not Path(args.img_prefix).is_dir():
        raise InputError(f"--img-prefix {args.img_prefix}: folder not found")
    dataset = CocoDetection(args.ann_file, args.img_prefix, train=False)
    chosen = [(r.img_id, r.path) for r in dataset.records]
    if args.images:
        wanted = {os.path.normpath(p) for p in args.images} | {Path(p).name for p in args.images}
        chosen = [(i, p) for i, p in chosen
                  if os.path.normpath(p) in wanted or Path(p).name in wanted]
        known = {os.path.normpath(p) for _, p in chosen} | {Path(p).name for _, p in chosen}
        unknown = [p for p in args.images if os.path.normpath(p) not in known and Path(p).name not in known]
        if unknown:
            raise InputError(f"--images not in --ann-file {args.ann_file}: {unknown[:5]}")
    return chosen, list(dataset.cat_ids), args.ann_file


def draw(path: str, det: Detections, out_png: Path, threshold: float) -> None:
    """Save the image at ``path`` with the detections scoring >= ``threshold`` drawn on it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = load_image(path, -1)[:, :, ::-1]  # BGR -> RGB for display
    h, w = img.shape[:2]
    fig = plt.figure(figsize=(w / 100, h / 100), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(img)
    ax.axis("off")
    colours = plt.get_cmap("tab20")
    boxes, scores, labels = det.bboxes.numpy(), det.scores.numpy(), det.labels.numpy()
    for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels):
        if score < threshold:
            continue
        colour = colours(int(label) % 20)
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.5))
        ax.text(x1, y1, f"{COCO_CLASSES[int(label)]} {score:.2f}", fontsize=7, color="white",
                va="bottom", bbox=dict(facecolor=colour, alpha=0.8, pad=1, edgecolor="none"))
    try:
        atomic_write(out_png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def prepare_image(img_id: int, path: str, scale, collate: Collate) -> tuple[paddle.Tensor, dict]:
    """One image through the test pipeline: the network input ``(1, 3, H, W)`` (normalised,
    padded) and its meta (``img_shape``, ``scale_factor``) for :func:`predict_boxes`."""
    img = load_image(path, img_id)
    empty = np.zeros((0, 4), np.float32)
    sample = test_pipeline(img, empty, np.zeros((0,), np.int64), np.zeros((0,), bool), scale)
    sample.update(img_id=img_id, img_path=path, key=(0, 0, -1))
    batch = collate.batch([sample])
    return batch["images"], {"img_shape": batch["img_shapes"][0], "scale_factor": batch["scale_factors"][0]}


def write_results(images: list[tuple[int, str]], results: list[Detections], cat_ids: list[int],
                  ann_file: str | None, out: str | Path, backend: str, draw_dir: str | Path | None = None,
                  draw_thr: float = 0.3) -> dict[str, float] | None:
    """The COCO results json ``out`` (atomically), the drawings and, with ``ann_file``, the
    12 box metrics (printed, and written beside ``out`` as ``<stem>.metrics.json``)."""
    records = detections_to_coco_json(results, [i for i, _ in images], cat_ids, out_file=str(out))
    print(f"{len(records)} detections on {len(images)} images -> {out}")
    if draw_dir:
        for (img_id, path), det in zip(images, results):
            draw(path, det, Path(draw_dir) / f"{Path(path).stem}.png", draw_thr)
        print(f"drawings -> {draw_dir}")
    if ann_file is None:
        return None
    metrics = evaluate_bbox(ann_file, records, backend=backend)
    out = Path(out)
    write_json(out.with_name(out.stem + ".metrics.json"), metrics)
    for name, value in metrics.items():
        print(f"{name}: {value:.4f}")
    return metrics


def run(args: argparse.Namespace) -> dict[str, float] | None:
    """Predict every selected image; returns the box metrics when an annotation file was given."""
    backend = eval_backend(args)
    if not Path(args.weights).is_file():
        raise InputError(f"--weights {args.weights}: file not found")
    images, cat_ids, ann_file = select_images(args)
    model = RetinaNet.from_config()
    with tempfile.TemporaryDirectory(prefix="ghm-weights-") as tmp:
        # An mmdet .pth goes through the converter's own command: no torch here.
        weights = convert_torch_checkpoint(args.weights, "--weights", tmp)
        load_weights(model, load_weights_file(weights, "--weights"), f"--weights {args.weights}")
    model.eval()
    scale = args.scale or get_config()["data"]["test_scale"]
    collate = Collate()
    results = []
    for img_id, path in images:
        batch, meta = prepare_image(img_id, path, scale, collate)
        results.append(model.predict(batch, [meta])[0])
    return write_results(images, results, cat_ids, ann_file, args.out, backend, args.draw_dir, args.draw_thr)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def call() -> int:
        run(args)
        return 0

    return run_command(call, argv)


if __name__ == "__main__":
    sys.exit(main())
