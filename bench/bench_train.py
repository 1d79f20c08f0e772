"""Time one training step of mmdet's GHM RetinaNet (torch) against ours (Paddle).

    python -m bench.bench_train [--repeats 3] [--out reports/bench_train.json]
                                [--sizes 768x512,1344x800] [--threads N] [--ckpt mmdet.pth]

A step is one training iteration on a batch of 2 images: forward, head loss
(anchor targets and one GHM-C and one GHM-R call per FPN level), backward,
gradient clipping and the SGD update. Both sides are driven as the backward
alignment stage drives them (``align.backward.stage``):

* mmdet: ``model.loss`` of the model built from mmdet's config, then
  mmengine's ``OptimWrapper`` (backward, clip, ``SGD.step``, ``zero_grad``)
  and the iteration schedulers;
* ours: the engine's ``train_step`` (``RetinaNet.loss``, ``backward``, clip, SGD, ``clear_grad``)
  and ``WarmupMultiStepLR``.

Both start from the same weights (the seeded synthetic checkpoint unless
``--ckpt``) and train on the same seeded batch, float32, in training mode.
Per batch size each side takes one warm-up step, then ``--repeats`` timed
steps; the two frameworks alternate step by step, so a change of load on the
shared machine hits both alike. Reported are medians.

The head-loss time is the wall time of the loss's forward computation inside
the step: mmdet's ``bbox_head.loss_by_feat`` (``get_targets`` plus the
per-level losses) against our ``target_builder`` plus ``bbox_head.loss``.
Their backward is part of the step's backward and not separated.

Threads. torch runs its CPU kernels on every core by default, Paddle's CPU
math library on one thread (``FLAGS_paddle_num_threads`` is 1). Both are
given the same number of threads, ``--threads`` (default: torch's default,
the cores available), so the comparison is of the implementations, not of
the defaults; ``--threads 0`` keeps each library's default instead. The
settings are recorded with the load average before and after (the cores are
shared).

CPU runtime. Paddle's process settings are those of training
(``paddle_impl.engine.runtime.configure_cpu``, applied before Paddle is imported): on
a non-Intel x86 CPU they let the MKL that Paddle's conv2d runs on use its
AVX2/AVX-512 kernels instead of its generic ones. ``--no-cpu-config`` skips
them, to measure the library as installed.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

from common.arguments import non_negative, parse_size, positive
from common.atomic_write import write_json
from bench.machine import load_average, machine_info, set_threads

DEFAULT_SIZES = "768x512,1344x800"
BATCH = 2


class Stopwatch:
    """Accumulates the wall time spent in wrapped calls."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


@contextlib.contextmanager
def patched(obj, name: str, value):
    """Shadow the method ``obj.name`` with the instance attribute ``value`` for the block."""
    setattr(obj, name, value)
    try:
        yield
    finally:
        delattr(obj, name)


def torch_loss_timer(trainer, watch: Stopwatch):
    head = trainer.model.bbox_head
    return patched(head, "loss_by_feat", watch.wrap(head.loss_by_feat))


@contextlib.contextmanager
def paddle_loss_timer(trainer, watch: Stopwatch):
    model = trainer.model
    builder, head_loss = model.target_builder, model.bbox_head.loss
    model.target_builder = watch.wrap(builder)
    try:
        with patched(model.bbox_head, "loss", watch.wrap(head_loss)):
            yield
    finally:
        model.target_builder = builder


def timed_step(side, loss_timer, inputs) -> tuple[float, float, float]:
    """One training step of a side; returns (step seconds, head-loss seconds, total loss)."""
    watch = Stopwatch()
    with loss_timer(side, watch):
        start = time.perf_counter()
        values = side.train_step(inputs)
        seconds = time.perf_counter() - start
    return seconds, watch.seconds, float(values.losses["loss.total"])


def measure(size: tuple[int, int], repeats: int, ckpts, seed: int) -> dict:
    """Warm-up and ``repeats`` timed steps of both sides on one batch size."""
    from align.ghm.fake_batch import random_batch
    from align.ghm.pair import build_paddle_model, build_torch_model, seeded_images
    from align.ghm.sides import FakeInputs, MmdetSide, PaddleSide
    from paddle_impl.config import get_config

    cfg = get_config()["optimizer"]
    settings = dict(lr=cfg["lr"], warmup=cfg["warmup_iters"], iters_per_epoch=repeats + 1)
    torch_side = MmdetSide(build_torch_model(ckpts), **settings)
    paddle_side = PaddleSide.from_config(build_paddle_model(ckpts), **settings)
    batch = random_batch(size, seed, num_images=BATCH)
    inputs = FakeInputs(seeded_images((BATCH, 3) + size, seed), batch)

    samples = {"mmdet": [], "paddle": []}
    warmup = {}
    for k in range(repeats + 1):
        for name, trainer, timer in (("mmdet", torch_side, torch_loss_timer),
                                     ("paddle", paddle_side, paddle_loss_timer)):
            step_s, loss_s, total = timed_step(trainer, timer, inputs)
            if k == 0:
                warmup[name] = dict(step_s=step_s, loss_s=loss_s, total_loss=total)
            else:
                samples[name].append((step_s, loss_s))
            print(f"  {size[1]}x{size[0]} {'warm-up' if k == 0 else f'repeat {k}':9s} {name:6s} "
                  f"step {step_s:7.2f} s, head loss {loss_s:6.2f} s", flush=True)

    # ``size``: (H, W) of the batch tensor; printed as WxH like every size the commands take.
    row = dict(size=list(size), batch=BATCH, gt_boxes_per_image=[len(b) for b in batch.gt_bboxes])
    for name, values in samples.items():
        row[f"{name}_step_s"] = statistics.median(v[0] for v in values)
        row[f"{name}_loss_s"] = statistics.median(v[1] for v in values)
        row[f"{name}_samples_s"] = [dict(step=s, loss=l) for s, l in values]
        row[f"{name}_loss_share"] = row[f"{name}_loss_s"] / row[f"{name}_step_s"]
    row["step_ratio_mmdet_over_paddle"] = row["mmdet_step_s"] / row["paddle_step_s"]
    row["loss_ratio_mmdet_over_paddle"] = row["mmdet_loss_s"] / row["paddle_loss_s"]
    # Same weights and batch, so the warm-up losses must agree: the two sides time the same computation.
    t, p = warmup["mmdet"]["total_loss"], warmup["paddle"]["total_loss"]
    row["warmup"] = warmup
    row["warmup_total_loss_rel_diff"] = abs(p - t) / abs(t)
    return row


def environment(repeats: int, ckpts, threads: int, cpu_config: dict | None) -> dict:
    import paddle
    import torch

    return dict(
        **machine_info(),
        repeats=repeats,
        threads_requested=threads if threads > 0 else "library defaults",
        # Paddle has no getter for the count set by core.set_num_threads.
        paddle_num_threads=threads if threads > 0 else paddle.get_flags(
            ["FLAGS_paddle_num_threads"])["FLAGS_paddle_num_threads"],
        torch_mkldnn_enabled=torch.backends.mkldnn.enabled,
        paddle_flags=paddle.get_flags(["FLAGS_use_mkldnn", "FLAGS_paddle_num_threads"]),
        paddle_cpu_config=cpu_config if cpu_config is not None else "skipped (--no-cpu-config)",
        mkl_debug_cpu_type=os.environ.get("MKL_DEBUG_CPU_TYPE"),
        checkpoint=str(ckpts.torch_path),
        checkpoint_sha256=ckpts.sha256,
    )


def print_table(rows: list[dict]) -> None:
    print(f"{'size':>9s} {'mmdet step':>11s} {'paddle step':>12s} {'ratio':>6s}   "
          f"{'mmdet loss':>16s} {'paddle loss':>17s} {'ratio':>6s}   {'loss rel diff':>13s}")
    for r in rows:
        size = f"{r['size'][1]}x{r['size'][0]}"
        print(f"{size:>9s} {r['mmdet_step_s']:>9.2f} s {r['paddle_step_s']:>10.2f} s "
              f"{r['step_ratio_mmdet_over_paddle']:>6.2f}   "
              f"{r['mmdet_loss_s']:>7.2f} s ({100 * r['mmdet_loss_share']:3.0f}%) "
              f"{r['paddle_loss_s']:>8.2f} s ({100 * r['paddle_loss_share']:3.0f}%) "
              f"{r['loss_ratio_mmdet_over_paddle']:>6.2f}   {r['warmup_total_loss_rel_diff']:>13.1e}")
    print("ratio = mmdet time / paddle time (above 1: ours is faster); loss = head loss incl. "
          "target assignment, forward part, and its share of the step")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive, default=3, help="timed steps per side and size")
    parser.add_argument("--out", default="reports/bench_train.json", help="JSON report path")
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help="comma-separated image sizes WxH (default %(default)s)")
    parser.add_argument("--ckpt", help="mmdet checkpoint (default: the seeded synthetic one)")
    parser.add_argument("--seed", type=non_negative, default=0)
    parser.add_argument("--threads", type=non_negative,
                        help="CPU threads of both libraries (default: torch's default; 0: each "
                             "library's own default)")
    parser.add_argument("--no-cpu-config", action="store_true",
                        help="skip paddle_impl.engine.runtime.configure_cpu (Paddle as installed)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    try:
        # (h, w): the batch tensor's own order.
        sizes = [parse_size(s)[::-1] for s in args.sizes.split(",")]
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))

    from paddle_impl.engine.runtime import configure_cpu

    # Before Paddle is imported: MKL fixes its kernel choice at its first call.
    cpu_config = None if args.no_cpu_config else configure_cpu()

    import paddle

    from align.ghm.pair import prepare_checkpoints

    paddle.set_device("cpu")
    threads = set_threads(args.threads)
    ckpts = prepare_checkpoints(args.ckpt, args.seed)
    load_before = load_average()
    started = time.perf_counter()
    rows = [measure(size, args.repeats, ckpts, args.seed) for size in sizes]
    report = dict(environment=environment(args.repeats, ckpts, threads, cpu_config), rows=rows,
                  load_average_before=load_before, load_average_after=load_average(),
                  wall_s=time.perf_counter() - started)
    print_table(rows)
    print(f"load average before {load_before}, after {report['load_average_after']}")
    print(f"wrote {write_json(args.out, report, indent=2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
