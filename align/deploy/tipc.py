"""The train-export-infer chain on the tiny COCO (Paddle's TIPC "lite train, lite infer").

    python -m align.deploy.tipc [--work-dir build/tipc] [--iters 4] [--scale 320x192] [--seed 0]

1. ``python -m paddle_impl.train`` trains ``--iters`` iterations on the seeded
   tiny COCO (its log lines carry avg_reader_cost, avg_batch_cost, avg_ips),
   starting from the seeded checkpoint with its classifier sharpened as in the
   predict stage, so the trained detector has detections to evaluate;
2. ``python -m paddle_impl.predict`` evaluates ``model_final.pdparams`` on the
   val images in the dynamic graph (the 12 COCO box numbers);
3. ``python -m paddle_impl.export`` exports it;
4. ``python -m paddle_impl.infer`` evaluates the export on Paddle Inference
   (oneDNN) and on ONNX Runtime.

Each program runs as its own command (its ``main``), as a user would run it.
Passes when each backend's detections equal the dynamic graph's within the
predict stage's bounds and pairing (per image the same count; classes,
boxes 1e-3 px, scores 1e-5) and its 12 COCO numbers equal the dynamic
graph's exactly, twice: against the tiny COCO's annotations and against a
seeded reference made from the dynamic graph's own best detections (the 10
best of each image, each box moved and resized by up to 15 %). A few iterations
leave the detector far from the tiny COCO's boxes, so the first 12 numbers
are 0; the second set lies between 0 and 1, where a box, score or class that
differs moves it. ``WORK_DIR/tipc.json`` records all of them. Exit status 0
when they agree, 1 when not, 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from common.arguments import format_size, non_negative, parse_size, positive
from common.atomic_write import write_json

PATHS = ("dynamic", "paddle-inference", "onnxruntime")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m align.deploy.tipc", description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=Path("build/tipc"), help="replaced on every run")
    p.add_argument("--iters", type=positive, default=4, help="training iterations (default %(default)s)")
    p.add_argument("--scale", type=parse_size, default=(320, 192), help="train and test Resize bound WxH "
                                                                        "(default %(default)s)")
    p.add_argument("--seed", type=non_negative, default=0)
    p.add_argument("--build-dir", type=Path, default=Path("build"),
                   help="where the tiny COCO and the seeded checkpoint are made once (default %(default)s)")
    return p.parse_args(argv)


REFERENCE_PER_IMAGE, REFERENCE_JITTER = 10, 0.15


def _per_image(records: list[dict], image_id: int) -> dict:
    mine = [r for r in records if r["image_id"] == image_id]
    return {"labels": np.array([r["category_id"] for r in mine], np.int64),
            "bboxes": np.array([r["bbox"] for r in mine], np.float64).reshape(-1, 4),
            "scores": np.array([r["score"] for r in mine], np.float64)}


def same_detections(ref: list[dict], got: list[dict]) -> bool:
    """COCO result lists: each image's detections equal within the predict stage's bounds and
    pairing (`align.predict.stage.same_detections`)."""
    from align.predict.stage import same_detections as same_image

    if len(ref) != len(got) or sorted(r["image_id"] for r in ref) != sorted(g["image_id"] for g in got):
        return False
    return all(same_image(_per_image(ref, image_id), _per_image(got, image_id))
               for image_id in sorted({r["image_id"] for r in ref}))


def reference_annotations(ann_file: Path, records: list[dict], seed: int) -> dict:
    """A COCO annotation set of ``ann_file``'s images and categories whose objects are the
    10 best ``records`` of each image, each box shifted and resized by a seeded up-to-15 %."""
    data = json.loads(Path(ann_file).read_text())
    rng = np.random.default_rng(seed)
    best = []
    for image_id in sorted({r["image_id"] for r in records}):
        mine = sorted((r for r in records if r["image_id"] == image_id), key=lambda r: -r["score"])
        best += mine[:REFERENCE_PER_IMAGE]
    annotations = []
    for record in best:
        x, y, w, h = record["bbox"]
        dx, dy, sw, sh = rng.uniform(-REFERENCE_JITTER, REFERENCE_JITTER, 4)
        box = [x + dx * w, y + dy * h, w * (1 + sw), h * (1 + sh)]
        annotations.append({"id": len(annotations) + 1, "image_id": record["image_id"],
                            "category_id": record["category_id"], "bbox": box, "area": box[2] * box[3],
                            "iscrowd": 0})
    return {"images": data["images"], "categories": data["categories"], "annotations": annotations}


def _step(name: str, main, argv: list[str]) -> None:
    print(f"[tipc] {name}: {' '.join(argv)}", file=sys.stderr, flush=True)
    status = main(argv)
    if status != 0:
        raise SystemExit(f"[tipc] {name} failed with exit status {status}")


def run(args: argparse.Namespace) -> int:
    from align.ghm.pair import prepare_checkpoints
    from align.ghm.pipelines import VAL_SPLIT, ann_file, tiny_coco_root
    from align.predict.stage import sharpened_checkpoint
    from paddle_impl.evaluation.coco_eval import evaluate_bbox
    from paddle_impl.export import main as export_main
    from paddle_impl.infer import RESULTS_FILE
    from paddle_impl.infer import main as infer_main
    from paddle_impl.predict import main as predict_main
    from paddle_impl.train import main as train_main

    root = tiny_coco_root(args.build_dir, args.seed)
    given = prepare_checkpoints(None, args.seed, args.build_dir)
    init = prepare_checkpoints(str(sharpened_checkpoint(given, args.seed, args.build_dir)), args.seed,
                               args.build_dir).paddle_path
    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    scale = format_size(args.scale)
    evaluation = ["--ann-file", str(ann_file(root, VAL_SPLIT)), "--img-prefix", str(root / VAL_SPLIT)]

    _step("train", train_main, ["--coco", str(root), "--work-dir", str(work / "train"), "--init", str(init),
                                "--max-iters", str(args.iters), "--scale", scale, "--num-workers", "0",
                                "--no-progress", "--eval-interval", "0", "--seed", str(args.seed),
                                "--reports", str(work / "train")])
    weights = str(work / "train" / "model_final.pdparams")
    _step("predict (dynamic graph)", predict_main, ["--weights", weights, *evaluation, "--scale", scale,
                                                    "--out", str(work / "dynamic" / RESULTS_FILE)])
    _step("export", export_main, ["--weights", weights, "--out", str(work / "export"), "--scale", scale])
    for backend in PATHS[1:]:
        _step(f"infer ({backend})", infer_main, ["--model", str(work / "export"), *evaluation,
                                                 "--backend", backend, "--out", str(work / backend)])

    metrics = {path: json.loads((work / path / RESULTS_FILE).with_suffix(".metrics.json").read_text())
               for path in PATHS}
    records = {path: json.loads((work / path / RESULTS_FILE).read_text()) for path in PATHS}
    reference = reference_annotations(ann_file(root, VAL_SPLIT), records["dynamic"], args.seed)
    write_json(work / "reference_annotations.json", reference)
    on_reference = {path: evaluate_bbox(reference, records[path]) for path in PATHS}
    detections = {path: len(records[path]) for path in PATHS}
    equal = {path: metrics[path] == metrics["dynamic"] and on_reference[path] == on_reference["dynamic"]
             and same_detections(records["dynamic"], records[path]) for path in PATHS[1:]}
    write_json(work / "tipc.json", {"iters": args.iters, "scale": list(args.scale), "seed": args.seed,
                                    "metrics": metrics, "metrics_on_reference": on_reference,
                                    "reference_objects": len(reference["annotations"]),
                                    "detections": detections, "equal_to_dynamic": equal,
                                    "passed": all(equal.values())}, indent=1)
    for title, table in [("tiny COCO annotations", metrics),
                         (f"reference: {len(reference['annotations'])} objects from the dynamic graph's "
                          f"detections", on_reference)]:
        print(f"{title}\n{'metric':<16}" + "".join(f"{p:>18}" for p in PATHS))
        for name in table["dynamic"]:
            print(f"{name:<16}" + "".join(f"{table[p][name]:>18.4f}" for p in PATHS))
    print(f"{'detections':<16}" + "".join(f"{detections[p]:>18}" for p in PATHS))
    verdict = "PASS" if all(equal.values()) else "FAIL"
    print(f"tipc: {verdict} (each backend against the dynamic graph: "
          + ", ".join(f"{p} {'equal' if ok else 'DIFFERENT'}" for p, ok in equal.items())
          + f"); {work / 'tipc.json'}")
    return 0 if all(equal.values()) else 1


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
