"""Time mmdet's GHM losses (torch) against ours (Paddle) at the reference scale, with their precision.

    python -m bench.bench_ghm [--repeats 5] [--forward-only] [--threads N] [--out reports/bench_ghm.json]

The inputs are those one training iteration of the reference model feeds the
losses: a batch of 2 images padded to 800x1344, FPN levels P3..P7 with
feature maps 100x168, 50x84, 25x42, 13x21 and 7x11, 9 anchors per location,
80 classes. mmdet's head calls each loss once per level:

* GHM-C on (2*H*W*9, 80) logits with (2*H*W*9,) class indices (background =
  80) and per-anchor label weights, zero for ignored anchors;
* GHM-R on (2*H*W*9, 4) deltas and targets with (2*H*W*9, 4) box weights,
  one on positive anchors and zero elsewhere.

Both libraries get the same seeded numpy arrays and the reference options
(``paddle_impl.config``), momentum included.

Timing. Every level is timed alone, and the five calls of one iteration in
sequence ("P3-P7"), in two modes: the forward call, and the forward call
with the backward pass to the predictions. mmdet's call and ours alternate,
after one warm-up each, so that a change of load on the shared machine hits
both alike; each figure is the median of ``--repeats`` calls, and the
speed-up is the ratio of the two medians. The load average before and after
is recorded with the threads each library used. torch runs its CPU kernels
on every core by default; our losses run their chunks on Paddle's CPU
thread count, ``OMP_NUM_THREADS`` (``paddle_impl.model.ghm_chunks``), which
Paddle sets to 1 unless the environment does. As ``bench.bench_train`` does,
both get the same count, ``--threads`` (default: torch's default, the cores
available), so that the comparison is of the implementations, not of the
defaults; ``--threads 0`` keeps each library's default.

Beside each speed:

* passes: the share of our call's time spent in the element-wise work: the
  two passes over the chunks or, for calls on the numpy path of
  ``paddle_impl.model.ghm_host``, its element-wise steps; the rest is
  per-call work (input checks, the region table, the reduction). Measured on
  extra calls with the passes timed.
* elem err: the largest error of an element's loss against the same loss in
  float64 on the same float32 inputs, for mmdet's element-wise loss and ours;
  relative to the loss for GHM-C (BCE on logits), relative to
  ``sqrt(d^2 + mu^2)`` for GHM-R (ASL1 subtracts mu from that root, and
  both libraries inherit the cancellation of that subtraction, so the root
  is the scale of their rounding). For "P3-P7", the largest over the levels.
* rel diff: the relative difference of the two libraries' loss values, and
  of their ``acc_sum`` after the calls, computed once on fresh modules.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import numpy as np
import paddle
import torch

from common.arguments import non_negative, positive
from common.atomic_write import write_json
from bench.machine import alternating_medians_ms, load_average, machine_info
from paddle_impl.config import get_config
from paddle_impl.model import ghm_chunks, ghm_host
from paddle_impl.model.ghm_elementwise import DeltasASL1, LogitsBCE
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
MODES = ("forward", "forward+backward")
# Rows of the float64 reference computed at a time (bounds its memory).
PRECISION_ROWS = 1 << 15


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


# The element-wise work of a call: the chunked passes, or the numpy steps of
# a call on `ghm_host`'s path.
ELEMENTWISE_STEPS = ((ghm_chunks, "run"), (ghm_host, "ghmc_arrays"), (ghm_host, "ghmr_arrays"),
                     (ghm_host, "byte_ids"), (ghm_host, "weighted_loss"))


@contextlib.contextmanager
def timed_passes(spent: list):
    """Appends the wall time of every element-wise pass or step of our losses to ``spent``."""
    originals = [(owner, name, getattr(owner, name)) for owner, name in ELEMENTWISE_STEPS]

    def timed(function):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - start)
        return call

    for owner, name, function in originals:
        setattr(owner, name, timed(function))
    try:
        yield
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)


def passes_share(module, inputs_per_call, backward: bool, repeats: int) -> float:
    """Median share of our calls' time spent in the element-wise passes."""
    shares = []
    for _ in range(repeats):
        passes: list = []
        start = time.perf_counter()
        with timed_passes(passes):
            for inputs in inputs_per_call:
                call_paddle(module, inputs, backward)
        shares.append(sum(passes) / (time.perf_counter() - start))
    return statistics.median(shares)


def elementwise_error(kind: str, arrays) -> dict:
    """The largest error of an element's loss against float64, mmdet's and ours on
    the path our call of the level takes (see the module docstring)."""
    import torch.nn.functional as F

    pred, target, weights = arrays
    mu = get_config()["bbox_head"]["loss_bbox"]["mu"]
    # Ours on the path the level's call takes.
    host = ghm_host.takes_size(pred.size)
    worst = {"mmdet": 0.0, "paddle": 0.0}
    for start in range(0, len(pred), PRECISION_ROWS):
        rows = slice(start, start + PRECISION_ROWS)
        p, t, w = pred[rows], target[rows], weights[rows]
        if kind == "cls":
            onehot = np.zeros_like(p)
            foreground = np.nonzero((t >= 0) & (t < p.shape[1]))[0]
            onehot[foreground, t[foreground]] = 1
            x = p.astype(np.float64)
            exact = np.maximum(x, 0) - x * onehot + np.log1p(np.exp(-np.abs(x)))
            scale = exact
            theirs = F.binary_cross_entropy_with_logits(torch.from_numpy(p), torch.from_numpy(onehot),
                                                        reduction="none").numpy()
            with paddle.no_grad():
                inputs = paddle.to_tensor(p), paddle.to_tensor(t), paddle.to_tensor(w)
                if host:
                    ours = ghm_host.ghmc_arrays(*inputs, True, ghm_host.Scratch()).loss
                else:
                    ours = LogitsBCE(*inputs).loss(None).numpy()
        else:
            d = p.astype(np.float64) - t.astype(np.float64)
            scale = np.sqrt(d * d + mu * mu)
            exact = scale - mu
            diff = torch.from_numpy(p) - torch.from_numpy(t)
            theirs = (torch.sqrt(diff * diff + mu * mu) - mu).numpy()
            with paddle.no_grad():
                inputs = paddle.to_tensor(p), paddle.to_tensor(t), paddle.to_tensor(w)
                if host:
                    ours = ghm_host.ghmr_arrays(*inputs, mu, ghm_host.Scratch()).loss
                else:
                    problem = DeltasASL1(*inputs, mu)
                    problem.derivative(None)
                    ours = problem.to_pred_shape(problem.loss(None)).numpy()
        for name, value in (("mmdet", theirs), ("paddle", ours)):
            worst[name] = max(worst[name], float(np.max(np.abs(value - exact) / scale)))
    return worst


def relative_difference(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / max(abs(theirs), 1e-30)


def agreement(kind: str, arrays) -> dict:
    """Loss values and ``acc_sum`` of fresh modules after the same calls in the same order."""
    theirs, ours = build_pair(kind)
    values = [(call_paddle(ours, as_paddle(a, False), False), call_torch(theirs, as_torch(a, False), False))
              for a in arrays]
    want = theirs.acc_sum.numpy()
    return dict(
        loss_values=[{"paddle": got, "mmdet": expected} for got, expected in values],
        max_relative_loss_difference=max(relative_difference(got, expected) for got, expected in values),
        max_relative_acc_sum_difference=float(np.max(np.abs(ours.acc_sum.numpy() - want)
                                                     / np.maximum(np.abs(want), 1e-30))))


def measure(kind: str, mode: str, level_names, arrays, repeats: int, errors: list) -> dict:
    """One table row: ``kind`` loss over the given levels, called in sequence."""
    backward = mode == "forward+backward"
    torch_inputs = [as_torch(a, backward) for a in arrays]
    paddle_inputs = [as_paddle(a, backward) for a in arrays]
    theirs, ours = build_pair(kind)
    mmdet_ms, paddle_ms = alternating_medians_ms(
        [lambda: [call_torch(theirs, t, backward) for t in torch_inputs],
         lambda: [call_paddle(ours, p, backward) for p in paddle_inputs]], repeats)
    return dict(
        loss=kind,
        mode=mode,
        levels=list(level_names),
        elements=int(sum(a[0].size for a in arrays)),
        shapes=[list(a[0].shape) for a in arrays],
        mmdet_ms=mmdet_ms,
        paddle_ms=paddle_ms,
        speedup=mmdet_ms / paddle_ms,
        passes_share=passes_share(ours, paddle_inputs, backward, repeats),
        elementwise_error={name: max(e[name] for e in errors) for name in ("mmdet", "paddle")},
        **agreement(kind, arrays),
    )


def environment(repeats: int) -> dict:
    return dict(
        **machine_info(),
        ghm_chunk_threads=ghm_chunks.threads(),
        ghm_chunk_elements=ghm_chunks.CHUNK_ELEMENTS,
        repeats=repeats,
        options=dict(loss_cls=get_config()["bbox_head"]["loss_cls"],
                     loss_bbox=get_config()["bbox_head"]["loss_bbox"]),
        inputs=dict(batch=BATCH, feature_sizes=[list(s) for s in FEATURE_SIZES],
                    anchors_per_location=ANCHORS_PER_LOCATION, num_classes=NUM_CLASSES,
                    positive_rate=POSITIVE_RATE, ignored_rate=IGNORED_RATE,
                    logit_mean=LOGIT_MEAN, logit_std=LOGIT_STD, seed=0),
    )


HEADER = (f"{'loss':6s} {'mode':17s} {'level':6s} {'elements':>11s} {'mmdet ms':>10s} {'paddle ms':>10s} "
          f"{'speed-up':>9s} {'passes':>7s} {'elem err mmdet':>15s} {'elem err ours':>14s} {'rel diff':>9s}")


def format_row(row: dict) -> str:
    levels = row["levels"][0] if len(row["levels"]) == 1 else "P3-P7"
    name = {"cls": "GHM-C", "box": "GHM-R"}[row["loss"]]
    error = row["elementwise_error"]
    return (f"{name:6s} {row['mode']:17s} {levels:6s} {row['elements']:>11,d} "
            f"{row['mmdet_ms']:>10.1f} {row['paddle_ms']:>10.1f} {row['speedup']:>8.2f}x "
            f"{100 * row['passes_share']:>6.0f}% {error['mmdet']:>15.1e} {error['paddle']:>14.1e} "
            f"{row['max_relative_loss_difference']:>9.1e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive, default=5, help="timed calls per measurement")
    parser.add_argument("--out", default="reports/bench_ghm.json", help="JSON report path")
    parser.add_argument("--forward-only", action="store_true", help="skip the forward+backward rows")
    parser.add_argument("--threads", type=non_negative, default=None,
                        help="threads for both libraries (default: torch's default, the cores available; "
                             "0: each library's default)")
    args = parser.parse_args(argv)

    paddle.set_device("cpu")
    threads = torch.get_num_threads() if args.threads is None else args.threads
    if threads > 0:
        torch.set_num_threads(threads)
        ghm_chunks.set_threads(threads)
    load_before = load_average()
    print(f"load average {load_before}; threads: torch {torch.get_num_threads()}, "
          f"ours {ghm_chunks.threads()}", flush=True)
    rng = np.random.default_rng(0)
    data = [level_inputs(rng, h, w) for h, w in FEATURE_SIZES]
    errors = {kind: [elementwise_error(kind, level[kind]) for level in data] for kind in ("cls", "box")}

    print(HEADER, flush=True)
    rows = []
    for mode in MODES[:1] if args.forward_only else MODES:
        for kind in ("cls", "box"):
            for index, name in enumerate(LEVELS):
                rows.append(measure(kind, mode, [name], [data[index][kind]], args.repeats,
                                    [errors[kind][index]]))
                print(format_row(rows[-1]), flush=True)
            rows.append(measure(kind, mode, LEVELS, [level[kind] for level in data], args.repeats,
                                errors[kind]))
            print(format_row(rows[-1]), flush=True)

    load_after = load_average()
    print(f"load average {load_after}", flush=True)
    report = dict(environment=environment(args.repeats), rows=rows,
                  load_average_before=load_before, load_average_after=load_after)
    print(f"wrote {write_json(args.out, report, indent=2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
