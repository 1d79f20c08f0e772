"""Overhead beyond the network: how much of a training iteration is not backbone, neck and head.

    python -m bench.overhead [--size 1333x800] [--batch 2] [--repeats 3] [--num-workers 2]
                             [--threads N] [--ckpt mmdet.pth] [--seed 0]
                             [--work-dir build/bench_overhead] [--out reports/bench_overhead.json]

One run, one batch: the first batch ``make train-full`` trains on when given
the tiny COCO (``build/tiny_coco/seed<seed>``, 8 images drawn at 480x320)
resized to fit ``--size`` (the training program's ``--scale``; with 1333x800,
the COCO setting, the images become 800 pixels high, and the batch is padded
to multiples of 32 as in training).
Each side is timed two ways on that batch:

Paddle, built by the training program's own ``Trainer`` (its argument
parser, model, ``--init`` weights loading, SGD, schedule, DataLoader):

(a) network: ``model(images)`` (backbone, FPN, head) to the raw per-level
    ``cls_scores`` ``(N, 720, H_l, W_l)`` and ``bbox_preds`` ``(N, 36, H_l, W_l)``,
    and the backward of ``sum_l sum(cls_l * R_l) + sum(box_l * S_l)`` with
    fixed seeded random weights ``R``, ``S`` of the same shapes: no targets,
    no GHM, no optimizer;
(b) iteration: what ``Trainer._train`` does per iteration, through
    ``Trainer.train_iteration``: the wait for the batch from the training
    ``DetDataLoader`` (``--num-workers`` workers, prefetching as in training;
    its batch sampler repeats the one batch), ``train_step`` (anchor targets,
    GHM-C / GHM-R per level, backward, clipping, SGD, the lr schedule), the
    sampler position and the log record appended to ``log.jsonl``.

mmdet, built from mmdet's config with the same weights (``align.ghm.sides.MmdetSide``):

(a) network: ``data_preprocessor`` (normalisation and padding; ours happens
    in the loader), ``extract_feat`` and ``bbox_head`` forward, and the
    backward of the same weighted sum;
(b) ``model.train_step`` with mmengine's ``OptimWrapper`` (loss path with
    ``loss_by_feat``, ``parse_losses``, backward, clipping, SGD) and the
    parameter schedulers, on the same images with the same flips through
    mmdet's own pipeline. mmengine's loop around it (its data loader, hooks)
    is not timed.

Reported per side: medians over ``--repeats`` rounds after one warm-up round,
and the non-network share ``1 - (a) / (b)``. For Paddle, (b) includes the
data wait as training sees it (with prefetching workers, usually near zero);
``non_network_share_of_step`` leaves it out, which is the like-for-like
comparison with mmdet's ``train_step``. The CPU work of making the batch
(decode, resize, flip, normalise, collate), which prefetching hides, is
measured apart as ``loading_work_s`` on both sides. The sides alternate within
each round, so a change of load on the shared machine hits both alike; how
far the share moved from round to round is ``non_network_share_range``. The
same share of this process's CPU time (``non_network_share_cpu``; every
thread of the process counted, DataLoader worker processes not) is a
cross-check on a loaded machine, a good one with ``--threads 1`` (with more
threads, the time they spend waiting for one another counts too); the
wall-time share is the one training sees.

Threads: as ``bench.bench_train``, both libraries get ``--threads`` (default:
torch's default, the cores available); ``--threads 0`` keeps each library's
default, which for Paddle is what ``make train-full`` runs with.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from common.arguments import format_size, non_negative, parse_size, positive
from paddle_impl.config import get_config
from common.errors import InputError
from paddle_impl.errors import run_command

DEFAULT_SIZE = format_size(get_config()["data"]["scale"])
WARMUP_ROUNDS = 1
# Per side: the times each round records, and the median ones the report and the summary give.
PADDLE_TIMES = ("network_s", "iteration_s", "data_wait_s", "step_s", "loading_work_s",
                "network_cpu_s", "iteration_cpu_s")
MMDET_TIMES = ("network_s", "train_step_s", "loading_work_s", "network_cpu_s", "train_step_cpu_s")
# Per side: each share's (network time, total time); the first is the headline one.
PADDLE_SHARES = {"non_network_share": ("network_s", "iteration_s"),
                 "non_network_share_of_step": ("network_s", "step_s"),
                 "non_network_share_cpu": ("network_cpu_s", "iteration_cpu_s")}
MMDET_SHARES = {"non_network_share": ("network_s", "train_step_s"),
                "non_network_share_cpu": ("network_cpu_s", "train_step_cpu_s")}


# Arguments and the report: no Paddle or torch here ----------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=DEFAULT_SIZE,
                   help="resize scale WxH of the training pipeline (default %(default)s, the COCO setting)")
    p.add_argument("--batch", type=positive, default=2, help="images per batch (default %(default)s)")
    p.add_argument("--repeats", type=positive, default=3, help="timed rounds after the warm-up (default %(default)s)")
    p.add_argument("--num-workers", type=non_negative, default=2,
                   help="DataLoader workers of the Paddle side (default %(default)s, as make train-full)")
    p.add_argument("--threads", type=non_negative,
                   help="CPU threads of both libraries (default: torch's default; 0: each library's own)")
    p.add_argument("--ckpt", help="mmdet checkpoint (default: the seeded synthetic one)")
    p.add_argument("--seed", type=non_negative, default=0)
    p.add_argument("--work-dir", type=Path, default=Path("build/bench_overhead"),
                   help="the Paddle trainer's work dir (its log.jsonl) goes under it")
    p.add_argument("--out", type=Path, default=Path("reports/bench_overhead.json"), help="JSON report")
    args = p.parse_args(argv)
    return args


def non_network_share(network_s: float, total_s: float) -> float:
    """``1 - network_s / total_s``: the part of ``total_s`` spent outside the network.

    Both must be positive and finite. A network time above the total (possible
    under a changing load) gives a negative share, reported as measured.
    """
    for name, value in (("network time", network_s), ("total time", total_s)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be positive and finite, got {value}")
    return 1.0 - network_s / total_s


def side_summary(rounds: list[dict[str, float]], times: Sequence[str],
                 shares: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Medians of ``times`` over the timed ``rounds``, and each share of ``shares``
    (name -> (network time, total time)) taken of the medians.

    The first share is also computed per round: its smallest and largest value
    (``non_network_share_range``) show how much the load of the machine moved it.
    """
    if not rounds:
        raise ValueError("no timed rounds")
    out: dict[str, Any] = {name: statistics.median(r[name] for r in rounds) for name in times}
    for name, (network, total) in shares.items():
        out[name] = non_network_share(out[network], out[total])
    network, total = next(iter(shares.values()))
    per_round = [non_network_share(r[network], r[total]) for r in rounds]
    out["non_network_share_range"] = [min(per_round), max(per_round)]
    out["rounds"] = rounds
    return out


def build_report(*, settings: dict, environment: dict, batch: dict, paddle_rounds: list[dict],
                 mmdet_rounds: list[dict], warmup: dict, load_average_before, load_average_after,
                 wall_s: float) -> dict[str, Any]:
    """The JSON document: both sides' medians and shares, every round, the run's conditions."""
    paddle = side_summary(paddle_rounds, PADDLE_TIMES, PADDLE_SHARES)
    mmdet = side_summary(mmdet_rounds, MMDET_TIMES, MMDET_SHARES)
    t, p = warmup["mmdet"]["loss"], warmup["paddle"]["loss"]
    return {
        "what": "share of a training iteration spent outside the network (backbone, neck, head "
                "forward and backward): Paddle as make train-full runs it, mmdet's train_step; one batch",
        "settings": settings, "environment": environment, "batch": batch,
        "paddle": paddle, "mmdet": mmdet,
        "warmup": warmup,
        # Same weights and images: equal first losses show both sides time the same computation.
        "first_step_loss_rel_diff": abs(p - t) / max(abs(t), 1e-30),
        "load_average_before": load_average_before, "load_average_after": load_average_after,
        "wall_s": wall_s,
    }


def summary_line(report: dict[str, Any], out: Path | str) -> str:
    """The one line printed at the end (the JSON has the rest)."""
    p, m, s = report["paddle"], report["mmdet"], report["settings"]
    h, w = report["batch"]["batch_input_shape"]

    def share(side: dict) -> str:
        low, high = side["non_network_share_range"]
        return (f"non-network {100 * side['non_network_share']:.1f}% (rounds {100 * low:.1f}..{100 * high:.1f}%, "
                f"CPU time {100 * side['non_network_share_cpu']:.1f}%)")

    return (f"overhead at {s['size']} (batch {s['batch']}x{w}x{h}), medians of {s['repeats']}: "
            f"paddle network {p['network_s']:.2f} s / iteration {p['iteration_s']:.2f} s "
            f"(data wait {p['data_wait_s']:.3f} s) -> {share(p)} | "
            f"mmdet network {m['network_s']:.2f} s / train_step {m['train_step_s']:.2f} s -> {share(m)} | {out}")


# The measurement ---------------------------------------------------------------------------------

class Clock:
    """Wall time and this process's CPU time (all its threads) of a ``with`` block.

    On a shared machine the wall time of a block grows with the other
    processes' load; its CPU time much less.
    """

    def __enter__(self) -> "Clock":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self._wall
        self.cpu_s = time.process_time() - self._cpu


class RepeatedBatch:
    """A batch sampler yielding the same keys ``times`` times (the DataLoader needs iteration and length)."""

    def __init__(self, keys: list, times: int):
        self.keys, self.times = list(keys), times

    def __iter__(self) -> Iterator[list]:
        for _ in range(self.times):
            yield list(self.keys)

    def __len__(self) -> int:
        return self.times


class WeightedSum:
    """``sum_l sum(cls_l * R_l) + sum(box_l * S_l)`` over the head's raw outputs, in either framework.

    The weights are standard normal float32, seeded by ``(seed, kind, level)``
    and made once per shape (in the warm-up round), so both frameworks and
    every round use the same ones.
    """

    def __init__(self, seed: int, to_tensor: Callable):
        self.seed, self.to_tensor, self.cache = seed, to_tensor, {}

    def weight(self, kind: int, level: int, shape: tuple[int, ...]):
        import numpy as np

        key = (kind, level, shape)
        if key not in self.cache:
            rng = np.random.default_rng([self.seed, kind, level])
            self.cache[key] = self.to_tensor(rng.standard_normal(shape).astype(np.float32))
        return self.cache[key]

    def __call__(self, cls_scores, bbox_preds):
        total = 0
        for kind, outputs in enumerate((cls_scores, bbox_preds)):
            for level, out in enumerate(outputs):
                total = total + (out * self.weight(kind, level, tuple(out.shape))).sum()
        return total


def build_trainer(args: argparse.Namespace, coco: Path, paddle_weights: Path):
    """The training program's ``Trainer`` on the tiny COCO: its parser, model, weights, optimizer."""
    from paddle_impl.engine.trainer import Trainer
    from paddle_impl.train import parse_args as train_args

    run_dir = args.work_dir / "paddle_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)  # Trainer.run makes it; the benchmark drives the iterations itself
    w, h = args.size
    return Trainer(train_args([
        "--coco", str(coco), "--work-dir", str(run_dir), "--scale", f"{w}x{h}",
        "--batch-size", str(args.batch), "--num-workers", str(args.num_workers), "--seed", str(args.seed),
        "--init", str(paddle_weights), "--eval-interval", "0", "--no-progress"]))


def mmdet_inputs(coco: Path, scale: tuple[int, int], img_ids: list[int], flips: list[bool]) -> Callable:
    """A function making mmdet's batch of those images and flips through mmdet's own pipeline
    (``CocoDataset`` and ``pseudo_collate``, what its data loader does per batch)."""
    from align.ghm.pipelines import mmdet_batch, mmdet_dataset, mmdet_setup

    cfg = mmdet_setup()
    # pycocotools reports its indexing on stdout, which carries only the summary line.
    with contextlib.redirect_stdout(sys.stderr):
        datasets = {flip: mmdet_dataset(cfg, coco, True, scale, flip_prob=1.0 if flip else 0.0)
                    for flip in (False, True)}
    where = {flip: {ds.get_data_info(i)["img_id"]: i for i in range(len(ds))} for flip, ds in datasets.items()}
    missing = [i for i in img_ids if i not in where[False]]
    if missing:
        raise RuntimeError(f"{coco}: mmdet's training set lacks image ids {missing}")
    return lambda: mmdet_batch([datasets[f][where[f][i]] for i, f in zip(img_ids, flips)])


def measure(args: argparse.Namespace, ckpts) -> tuple[dict, list[dict], list[dict], dict]:
    """Warm-up and timed rounds of both sides; returns (batch description, paddle rounds,
    mmdet rounds, warm-up values)."""
    import paddle
    import torch

    from align.ghm.pair import BUILD_DIR, build_torch_model
    from align.ghm.pipelines import tiny_coco_root
    from align.ghm.sides import MmdetSide, summed_terms
    from paddle_impl.data.dataset import DetDataLoader
    from paddle_impl.data.transforms import Collate

    coco = tiny_coco_root(BUILD_DIR, args.seed)
    trainer = build_trainer(args, coco, ckpts.paddle_path)
    sampler = trainer.loader.batch_sampler
    sampler.set_epoch(0)
    keys = next(iter(sampler))
    if len(keys) != args.batch:
        raise InputError(f"--batch {args.batch}: the first batch of {coco} has {len(keys)} images "
                         f"({len(trainer.train_set)} training images)")
    rounds = WARMUP_ROUNDS + args.repeats
    loader = iter(DetDataLoader(trainer.train_set, RepeatedBatch(keys, rounds), args.num_workers, Collate()))
    collate = Collate()

    mmdet_model = build_torch_model(ckpts)
    mmdet = MmdetSide(mmdet_model, lr=trainer.base_lr, warmup=trainer.cfg["optimizer"]["warmup_iters"],
                      iters_per_epoch=trainer.iters_per_epoch, terms=summed_terms)
    paddle_sum = WeightedSum(args.seed, paddle.to_tensor)
    torch_sum = WeightedSum(args.seed, torch.from_numpy)

    batch_info, make_mmdet_batch = None, None
    paddle_rounds, mmdet_rounds, warmup = [], [], {}
    for k in range(rounds):
        # Paddle (b): the loop's iteration, from asking the loader for the batch to the log record.
        with Clock() as iteration:
            t_data = time.perf_counter()
            batch = next(loader)
            record = trainer.train_iteration(batch, 0, t_data)
        if batch_info is None:
            batch_info = {"img_ids": list(batch["img_ids"]), "flips": list(batch["flips"]),
                          "keys": [tuple(key) for key in batch["keys"]],
                          "batch_input_shape": list(batch["batch_input_shape"]),
                          "img_shapes": [list(s) for s in batch["img_shapes"]],
                          "gt_boxes_per_image": [int(b.shape[0]) for b in batch["gt_bboxes"]]}
            make_mmdet_batch = mmdet_inputs(coco, args.size, batch_info["img_ids"], batch_info["flips"])
        # Paddle (a): the network alone on the same images.
        with Clock() as network:
            cls_scores, bbox_preds = trainer.model(batch["images"])
            value = paddle_sum(cls_scores, bbox_preds)
            value.backward()
            network_value = float(value)
        trainer.optimizer.clear_grad()
        del cls_scores, bbox_preds, value
        # The work of making the batch, which the loader's prefetching hides.
        start = time.perf_counter()
        collate.batch([trainer.train_set[key] for key in keys])
        paddle_loading = time.perf_counter() - start

        start = time.perf_counter()
        data_batch = make_mmdet_batch()
        mmdet_loading = time.perf_counter() - start
        # mmdet (b): train_step with the optimizer wrapper.
        with Clock() as train_step:
            step = mmdet.train_step(data_batch)
        # mmdet (a): preprocessor and network alone on the same images.
        with Clock() as mmdet_network:
            data = mmdet_model.data_preprocessor(data_batch, True)
            t_cls, t_box = mmdet_model.bbox_head(mmdet_model.extract_feat(data["inputs"]))
            t_value = torch_sum(t_cls, t_box)
            t_value.backward()
            mmdet_value = float(t_value.detach())
        mmdet.wrapper.zero_grad()
        del data, t_cls, t_box, t_value

        p_round = {"network_s": network.wall_s, "iteration_s": iteration.wall_s,
                   "data_wait_s": record["data_time"], "step_s": iteration.wall_s - record["data_time"],
                   "loading_work_s": paddle_loading, "log_time_s": record["time"],
                   "network_cpu_s": network.cpu_s, "iteration_cpu_s": iteration.cpu_s}
        m_round = {"network_s": mmdet_network.wall_s, "train_step_s": train_step.wall_s,
                   "loading_work_s": mmdet_loading, "network_cpu_s": mmdet_network.cpu_s,
                   "train_step_cpu_s": train_step.cpu_s}
        if k < WARMUP_ROUNDS:
            warmup = {"paddle": {**p_round, "loss": record["loss"], "network_value": network_value},
                      "mmdet": {**m_round, "loss": step.losses["loss"], "network_value": mmdet_value}}
        else:
            paddle_rounds.append(p_round)
            mmdet_rounds.append(m_round)
        label = "warm-up" if k < WARMUP_ROUNDS else f"round {k}/{args.repeats}"
        print(f"[overhead] {label}: paddle network {network.wall_s:.2f} s, iteration {iteration.wall_s:.2f} s; "
              f"mmdet network {mmdet_network.wall_s:.2f} s, train_step {train_step.wall_s:.2f} s", file=sys.stderr)
    return batch_info, paddle_rounds, mmdet_rounds, warmup


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, measure, write; exit status 0, or 2 with one line for bad input or a fault."""
    args = parse_args(argv)
    return run_command(lambda: _run(args), argv)


def _run(args: argparse.Namespace) -> int:
    from paddle_impl.engine.runtime import configure_cpu

    # The training program's settings, before Paddle is imported (MKL fixes its kernels at its first call).
    cpu_config = configure_cpu()

    import paddle

    from common.atomic_write import write_json
    from align.ghm.pair import prepare_checkpoints
    from bench.bench_train import environment
    from bench.machine import load_average, set_threads

    paddle.set_device("cpu")
    threads = set_threads(args.threads)
    ckpts = prepare_checkpoints(args.ckpt, args.seed)
    load_before = load_average()
    started = time.perf_counter()
    batch, paddle_rounds, mmdet_rounds, warmup = measure(args, ckpts)
    w, h = args.size
    settings = {"size": f"{w}x{h}", "batch": args.batch, "repeats": args.repeats,
                "warmup_rounds": WARMUP_ROUNDS, "num_workers": args.num_workers, "seed": args.seed,
                "work_dir": str(args.work_dir)}
    report = build_report(settings=settings, environment=environment(args.repeats, ckpts, threads, cpu_config),
                          batch=batch, paddle_rounds=paddle_rounds, mmdet_rounds=mmdet_rounds, warmup=warmup,
                          load_average_before=load_before, load_average_after=load_average(),
                          wall_s=time.perf_counter() - started)
    write_json(args.out, report, indent=2)
    print(summary_line(report, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
