"""Detect objects with an exported GHM RetinaNet on an inference engine; COCO results json and drawings.

Usage::

    python -m paddle_impl.infer --model DIR --images IMG [IMG ...] --out OUT_DIR
        [--backend paddle-inference|onnxruntime] [--device cpu|gpu] [--no-onednn] [--threads N]
        [--ann-file instances.json --img-prefix DIR [--eval-backend ...]] [--draw-thr 0.3]

``--model``: a folder written by ``python -m paddle_impl.export``. Each image
goes through the preprocessing its ``deploy.json`` records (our test pipeline:
resize keeping the ratio, normalise, pad to 32), the network runs on the
engine with the exported post-processing (the dynamic graph's own,
``paddle_impl.boxes.postprocess.detect``: score threshold, per-level top-k,
decode, class-wise NMS, at most 100), which maps the boxes back to original
pixels. Image and category ids as ``python -m paddle_impl.predict``
gives them (``--ann-file`` / ``--img-prefix`` as there).

``OUT_DIR`` gets ``detections.json`` (COCO results), one ``<stem>.png`` per
image with the boxes scoring at least ``--draw-thr``, and with ``--ann-file``
``detections.metrics.json``. Everything given is checked before ``OUT_DIR`` is
touched; exit status 0, or 2 on bad input with one line naming it.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from common.arguments import fraction, positive  # noqa: E402
from common.errors import InputError  # noqa: E402
from paddle_impl.arguments import add_eval_backend, eval_backend  # noqa: E402
from paddle_impl.boxes.postprocess import Detections, image_tensors  # noqa: E402
from paddle_impl.data.transforms import Collate  # noqa: E402
from paddle_impl.deploy.backends import BACKENDS, DEVICES, Engine, open_engine  # noqa: E402
from paddle_impl.deploy.model_dir import ModelDir  # noqa: E402
from paddle_impl.deploy.network import unpack  # noqa: E402
from paddle_impl.errors import run_command  # noqa: E402
from paddle_impl.predict import prepare_image, select_images, write_results  # noqa: E402

RESULTS_FILE = "detections.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m paddle_impl.infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="folder written by python -m paddle_impl.export")
    p.add_argument("--images", nargs="+", default=[], help="image files (with --ann-file: a subset)")
    p.add_argument("--ann-file", help="COCO instances json giving image ids (and ground truth to evaluate)")
    p.add_argument("--img-prefix", help="folder of the --ann-file images")
    p.add_argument("--out", required=True, help="folder for detections.json and the drawings")
    p.add_argument("--backend", default="paddle-inference", help=f"one of {', '.join(BACKENDS)} (default %(default)s)")
    p.add_argument("--device", default="cpu", help=f"one of {', '.join(DEVICES)} (default %(default)s)")
    p.add_argument("--no-onednn", action="store_true", help="paddle-inference on the CPU without oneDNN")
    p.add_argument("--threads", type=positive, help="CPU threads of the engine (default: every core available)")
    p.add_argument("--draw-thr", type=fraction, default=0.3, help="lowest score drawn (default 0.3)")
    add_eval_backend(p)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="with an error, also print its Python traceback (or set GHM_TRACEBACK=1)")
    return p.parse_args(argv)


def check_device(backend: str, device: str) -> None:
    """``backend`` and ``device`` are known and the installed packages can run them."""
    if backend not in BACKENDS:
        raise InputError(f"--backend {backend}: not one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise InputError(f"--device {device}: not one of {', '.join(DEVICES)}")
    if device != "gpu":
        return
    if backend == "paddle-inference" and not paddle.is_compiled_with_cuda():
        raise InputError("--device gpu: this paddlepaddle has no CUDA (install paddlepaddle-gpu)")
    if backend == "onnxruntime":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise InputError("--device gpu: this onnxruntime has no CUDA provider (install onnxruntime-gpu)")


def preprocessing(spec: dict) -> tuple[tuple[int, int], Collate]:
    """The resize bound ``(w, h)`` and the normalise-and-pad step an export's ``deploy.json`` records."""
    pre = spec["preprocess"]
    collate = Collate(mean=pre["mean_rgb"], std=pre["std_rgb"], bgr_to_rgb=pre["bgr_to_rgb"],
                      pad_size_divisor=pre["pad_size_divisor"], pad_value=pre["pad_value"])
    return tuple(pre["resize"]["scale_wh"]), collate


def engine_detections(engine: Engine, images: paddle.Tensor,
                      metas: list[dict]) -> tuple[list[np.ndarray], list[Detections]]:
    """A preprocessed batch ``(N, 3, H, W)`` through ``engine``: its raw outputs (``cls_scores``
    then ``bbox_preds``, per level) and its detections per image; ``metas`` per image
    ``img_shape`` and ``scale_factor``."""
    img_shape, inv_scale_factor = image_tensors(metas)
    return unpack(engine.run(images.numpy(), img_shape.numpy(), inv_scale_factor.numpy()))


def run(args: argparse.Namespace) -> dict[str, float] | None:
    """Infer every selected image; returns the box metrics when an annotation file was given."""
    check_device(args.backend, args.device)
    metric_backend = eval_backend(args)
    model = ModelDir(Path(args.model))
    spec = model.spec()
    model.require(args.backend)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    images, cat_ids, ann_file = select_images(args)
    engine = open_engine(args.backend, model, args.device, onednn=not args.no_onednn, threads=args.threads)
    scale, collate = preprocessing(spec)
    results = []
    for img_id, path in images:
        batch, meta = prepare_image(img_id, path, scale, collate)
        _, (det,) = engine_detections(engine, batch, [meta])
        results.append(det)
    return write_results(images, results, cat_ids, ann_file, out / RESULTS_FILE, metric_backend,
                         draw_dir=out, draw_thr=args.draw_thr)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def call() -> int:
        run(args)
        return 0

    return run_command(call, argv)


if __name__ == "__main__":
    sys.exit(main())
