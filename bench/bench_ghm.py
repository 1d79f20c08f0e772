"""Time mmdet's GHM losses (torch) against ours (Paddle) at the reference scale.

    python -m bench.bench_ghm [--repeats 5] [--out reports/bench_ghm.json] [--backward]

The inputs are those one training iteration of the reference model feeds the
losses: a batch of 2 images padded to 800x1344, FPN levels P3..P7 with
feature maps 100x168, 50x84, 25x42, 13x21 and 7x11, 9 anchors per location,
80 classes. mmdet's head calls each loss once per level:

* GHM-C on (2*H*W*9, 80) logits with (2*H*W*9,) class indices (background =
  80) and per-anchor label weights, zero for ignored anchors;
* GHM-R on (2*H*W*9, 4) deltas and targets with (2*H*W*9, 4) box weights,
  one on positive anchors and zero elsewhere.

Both libraries get the same seeded numpy arrays and the reference options
(``paddle_impl.config``), momentum included. Each measurement is the median
of ``--repeats`` calls after one warm-up call; the "P3-P7" row times the five
calls of one iteration in sequence. Before timing, a fresh pair of modules
computes each loss once and the relative difference of the two values is
reported, so the timings compare the same computation. Thread settings are
left at the libraries' defaults and recorded.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import paddle
import torch

from common.arguments import positive
from common.atomic_write import write_json
from bench.machine import load_average, machine_info
from paddle_impl.config import get_config
from paddle_impl.model.ghm_loss import GHMC, GHMR

LEVELS = ("P3", "P4", "P5", "P6", "P7")
FEATURE_SIZES = ((100, 168), (50, 84), (25, 42), (13, 21), (7, 11))
BATCH = 2
ANCHORS_PER_LOCATION = 9
NUM_CLASSES = 80
# Share of anchors that are positive and that are ignored (IoU in [0.4, 0.5)).
POSITIVE_RATE = 0.02
IGNORED_RATE = 0.03
# Logits start near log(0.01 / 0.99) (the head's prior-probability bias).
LOGIT_MEAN = -4.6
LOGIT_STD = 1.5


def level_inputs(rng: np.random.Generator, height: int, width: int) -> dict:
    """Numpy inputs of one level for both losses, float32 / int64."""
    n = BATCH * height * width * ANCHORS_PER_LOCATION
    draw = rng.random(n)
    positive = draw < POSITIVE_RATE
    ignored = (draw >= POSITIVE_RATE) & (draw < POSITIVE_RATE + IGNORED_RATE)
    labels = np.where(positive, rng.integers(0, NUM_CLASSES, n), NUM_CLASSES).astype(np.int64)
    logits = rng.normal(LOGIT_MEAN, LOGIT_STD, (n, NUM_CLASSES)).astype(np.float32)
    deltas = rng.normal(0.0, 0.5, (n, 4)).astype(np.float32)
    box_targets = np.where(positive[:, None], rng.normal(0.0, 0.5, (n, 4)), 0.0).astype(np.float32)
    return dict(
        cls=(logits, labels, (~ignored).astype(np.float32)),
        box=(deltas, box_targets, np.repeat(positive[:, None], 4, axis=1).astype(np.float32)),
    )


def build_pair(kind: str):
    """(mmdet module, our module) with the reference options of ``kind``."""
    from mmdet.models.losses import GHMC as MMDetGHMC
    from mmdet.models.losses import GHMR as MMDetGHMR

    head = get_config()["bbox_head"]
    if kind == "cls":
        return MMDetGHMC(**head["loss_cls"]), GHMC(**head["loss_cls"])
    return MMDetGHMR(**head["loss_bbox"]), GHMR(**head["loss_bbox"])


def as_torch(arrays, grad: bool):
    pred, *rest = arrays
    return [torch.from_numpy(pred).requires_grad_(grad)] + [torch.from_numpy(a) for a in rest]


def as_paddle(arrays, grad: bool):
    pred, *rest = arrays
    return [paddle.to_tensor(pred, stop_gradient=not grad)] + [paddle.to_tensor(a) for a in rest]


def call_torch(module, inputs, backward: bool) -> float:
    loss = module(*inputs)
    if backward:
        loss.backward()
        inputs[0].grad = None
    return float(loss.detach())


def call_paddle(module, inputs, backward: bool) -> float:
    loss = module(*inputs)
    if backward:
        loss.backward()
        inputs[0].clear_gradient()
    return float(loss)


def median_ms(run, repeats: int) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls, after one warm-up."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def relative_difference(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / max(abs(theirs), 1e-30)


def measure(kind: str, level_names, level_data, repeats: int, backward: bool) -> dict:
    """One table row: ``kind`` loss over the given levels, called in sequence."""
    arrays = [data[kind] for data in level_data]
    torch_inputs = [as_torch(a, backward) for a in arrays]
    paddle_inputs = [as_paddle(a, backward) for a in arrays]

    # Agreement: fresh modules, the same calls in the same order.
    theirs, ours = build_pair(kind)
    diffs, values = [], []
    for t_in, p_in in zip(torch_inputs, paddle_inputs):
        want = call_torch(theirs, t_in, False)
        got = call_paddle(ours, p_in, False)
        diffs.append(relative_difference(got, want))
        values.append((got, want))
    acc_diff = float(np.max(np.abs(ours.acc_sum.numpy() - theirs.acc_sum.numpy())
                            / np.maximum(np.abs(theirs.acc_sum.numpy()), 1e-30)))

    theirs, ours = build_pair(kind)
    mmdet_ms = median_ms(lambda: [call_torch(theirs, t, backward) for t in torch_inputs], repeats)
    paddle_ms = median_ms(lambda: [call_paddle(ours, p, backward) for p in paddle_inputs], repeats)
    return dict(
        loss=kind,
        mode="forward+backward" if backward else "forward",
        levels=list(level_names),
        elements=int(sum(a[0].size for a in arrays)),
        shapes=[list(a[0].shape) for a in arrays],
        mmdet_ms=mmdet_ms,
        paddle_ms=paddle_ms,
        speedup=mmdet_ms / paddle_ms,
        loss_values=[{"paddle": g, "mmdet": w} for g, w in values],
        max_relative_loss_difference=max(diffs),
        max_relative_acc_sum_difference=acc_diff,
    )


def environment(repeats: int) -> dict:
    return dict(
        **machine_info(),
        repeats=repeats,
        options=dict(loss_cls=get_config()["bbox_head"]["loss_cls"],
                     loss_bbox=get_config()["bbox_head"]["loss_bbox"]),
        inputs=dict(batch=BATCH, feature_sizes=[list(s) for s in FEATURE_SIZES],
                    anchors_per_location=ANCHORS_PER_LOCATION, num_classes=NUM_CLASSES,
                    positive_rate=POSITIVE_RATE, ignored_rate=IGNORED_RATE,
                    logit_mean=LOGIT_MEAN, logit_std=LOGIT_STD, seed=0),
    )


def print_row(row: dict) -> None:
    levels = row["levels"][0] if len(row["levels"]) == 1 else "P3-P7"
    name = {"cls": "GHM-C", "box": "GHM-R"}[row["loss"]]
    print(f"{name:6s} {row['mode']:17s} {levels:6s} {row['elements']:>11,d} "
          f"{row['mmdet_ms']:>10.1f} {row['paddle_ms']:>10.1f} {row['speedup']:>8.2f}x "
          f"{row['max_relative_loss_difference']:>10.1e}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive, default=5, help="timed calls per measurement")
    parser.add_argument("--out", default="reports/bench_ghm.json", help="JSON report path")
    parser.add_argument("--backward", action="store_true",
                        help="also time forward+backward (the gradient w.r.t. the predictions)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    paddle.set_device("cpu")
    load_before = load_average()
    rng = np.random.default_rng(0)
    data = [level_inputs(rng, h, w) for h, w in FEATURE_SIZES]

    print(f"{'loss':6s} {'mode':17s} {'level':6s} {'elements':>11s} {'mmdet ms':>10s} "
          f"{'paddle ms':>10s} {'speed-up':>9s} {'rel diff':>10s}")
    rows = []
    modes = (False, True) if args.backward else (False,)
    for backward in modes:
        for kind in ("cls", "box"):
            for name, level in zip(LEVELS, data):
                rows.append(measure(kind, [name], [level], args.repeats, backward))
                print_row(rows[-1])
            rows.append(measure(kind, LEVELS, data, args.repeats, backward))
            print_row(rows[-1])

    report = dict(environment=environment(args.repeats), rows=rows,
                  load_average_before=load_before, load_average_after=load_average())
    print(f"wrote {write_json(args.out, report, indent=2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
