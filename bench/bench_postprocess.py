"""Post-processing alone: mmdet's ``RetinaHead.predict_by_feat`` against our ``predict_boxes``.

    python -m bench.bench_postprocess [--repeats 5] [--size 1333x800] [--out reports/bench_postprocess.json]

Both take the same seeded head outputs of one image the size the test
pipeline makes of a 1333x800 picture (maps of an 800x1344 input) and return
its detections (score threshold, per-level top-k, decode, NMS, at most 100).
Two cases: ``typical``, logits around -6 (about 2 % of all (anchor, class)
pairs above 0.05), and ``dense``, logits around -2.5 (about 60 %). Each side runs once to warm
up, then ``--repeats`` times, taking turns; printed are the median times and
their ratio (mmdet / ours: above 1 is faster than mmdet), and whether the two
detection lists agree within the predict stage's bounds and pairing (count,
labels, boxes 1e-3 px, scores 1e-5).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from bench.machine import alternating_medians_ms, load_average, machine_info, set_threads
from common.arguments import non_negative, parse_size, positive
from common.atomic_write import write_json

CASES = {"typical": -6.0, "dense": -2.5}
NUM_ANCHORS, NUM_CLASSES = 9, 80
STRIDES = (8, 16, 32, 64, 128)


def head_outputs(size_hw: tuple[int, int], offset: float, seed: int) -> tuple[list, list]:
    """Per level ``(1, A*C, H_l, W_l)`` logits around ``offset`` and ``(1, A*4, H_l, W_l)`` deltas."""
    rng = np.random.default_rng(seed)
    cls, reg = [], []
    for stride in STRIDES:
        h, w = -(-size_hw[0] // stride), -(-size_hw[1] // stride)
        cls.append((rng.standard_normal((1, NUM_ANCHORS * NUM_CLASSES, h, w)) * 1.5 + offset).astype(np.float32))
        reg.append((rng.standard_normal((1, NUM_ANCHORS * 4, h, w)) * 0.5).astype(np.float32))
    return cls, reg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive, default=5, help="timed calls per side and case")
    parser.add_argument("--size", type=parse_size, default=(1333, 800), help="picture size WxH (default 1333x800)")
    parser.add_argument("--seed", type=non_negative, default=0)
    parser.add_argument("--threads", type=positive, help="CPU threads of both sides (default: the cores available)")
    parser.add_argument("--out", default="reports/bench_postprocess.json", help="JSON report path")
    args = parser.parse_args(argv)

    import os

    import paddle
    import torch

    from align.predict.stage import same_detections
    from paddle_impl.boxes.postprocess import predict_boxes
    from torch_ref.reference import build_reference

    threads = set_threads(args.threads or len(os.sched_getaffinity(0)))
    head = build_reference(seed=args.seed).bbox_head.eval()
    test_cfg = head.test_cfg
    factor = min(1333 / max(args.size), 800 / min(args.size))
    img_shape = (int(args.size[1] * factor + 0.5), int(args.size[0] * factor + 0.5))
    size_hw = tuple(-(-side // 32) * 32 for side in img_shape)
    meta = {"img_shape": img_shape, "scale_factor": (img_shape[1] / args.size[0], img_shape[0] / args.size[1])}
    load_before = load_average()
    rows = []
    for case, offset in CASES.items():
        cls, reg = head_outputs(size_hw, offset, args.seed)
        torch_in = ([torch.from_numpy(c) for c in cls], [torch.from_numpy(r) for r in reg])
        paddle_in = ([paddle.to_tensor(c) for c in cls], [paddle.to_tensor(r) for r in reg])

        def theirs():
            with torch.no_grad():
                return head.predict_by_feat(*torch_in, batch_img_metas=[meta], cfg=test_cfg, rescale=True)[0]

        def ours():
            return predict_boxes(*paddle_in, [meta])[0]

        mm_ms, our_ms = alternating_medians_ms([theirs, ours], args.repeats)
        ref, got = theirs(), ours()
        agree = same_detections(*({"labels": d.labels.numpy().astype(np.int64), "bboxes": d.bboxes.numpy(),
                                   "scores": d.scores.numpy()} for d in (ref, got)))
        candidates = int(sum((1 / (1 + np.exp(-c)) > test_cfg.score_thr).sum() for c in cls))
        rows.append({"case": case, "candidates": candidates, "detections": len(got.scores), "mmdet_ms": mm_ms,
                     "ours_ms": our_ms, "ratio_to_mmdet": mm_ms / our_ms, "detections_agree": agree})
    report = {"machine": machine_info(), "threads": threads, "repeats": args.repeats,
              "input_hw": list(size_hw), "rows": rows, "load_average_before": load_before,
              "load_average_after": load_average()}
    print(f"post-processing of one {size_hw[0]}x{size_hw[1]} input's head outputs, median of {args.repeats}, "
          f"{threads} threads")
    print(f"{'case':<8} {'candidates':>11} {'mmdet ms':>10} {'ours ms':>10} {'ratio':>7}  detections")
    for row in rows:
        print(f"{row['case']:<8} {row['candidates']:>11} {row['mmdet_ms']:>10.1f} {row['ours_ms']:>10.1f} "
              f"{row['ratio_to_mmdet']:>6.2f}x  {row['detections']} "
              f"{'equal' if row['detections_agree'] else 'DIFFERENT'}")
    print("(ratio = mmdet time / our time: above 1 is faster than mmdet)")
    print(f"load average before {load_before}, after {report['load_average_after']}")
    print(f"wrote {write_json(args.out, report, indent=2)}")
    return 0 if all(row["detections_agree"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
