"""Multi-process data parallel on CPU: 2 processes x 2 images against its single-process emulation.

    python -m bench.data_parallel [--iters 4] [--work-dir build/data_parallel]
                                  [--out reports/data_parallel.json] [--lr 0.01] [--seed 0]
                                  [--scale 128x96] [--train-images 40] [--timeout 1200]

Three trainings from the same seeded weights over the same images, iteration by
iteration, on a generated tiny COCO at a small scale:

(a) ``python -m paddle.distributed.launch --nproc_per_node 2`` of the training program
    (through ``paddle_impl.launch.job``):
    two CPU processes (gloo) x 2 images, ``paddle.DataParallel``;
(b) its emulation in this one process: every iteration, the two batches the
    distributed sampler gives rank 0 and rank 1, each loss computed with that
    rank's own GHM momentum buffers (swapped in and out of the model), the two
    gradients summed in rank order and divided by the world size (what
    DataParallel's all-reduce does), then the same clip + SGD step and lr
    schedule (``paddle_impl.engine.optimizer.SGD``, ``WarmupMultiStepLR``);
(c) one process x 4 images: the same two batches joined into one, one GHM state.

Why (b) and not (c) is the exact counterpart of (a). Each GHM loss computes its
gradient-density weights and its normalisation from the elements of the batch
it is given and keeps one momentum buffer per process, as mmdet's distributed
training does. So 2 x 2 images is not 1 x 4 images: (a) vs (c) measures that
effect, (a) vs (b) checks the data-parallel machinery (sampler shares, gradient
averaging, identical updates on both ranks) and should agree to float32
rounding. A control run, (b) with the gradients summed instead of averaged,
shows the comparison would notice a missing average.

Both sides start from ``paddle.seed(seed)`` weights (the training script's
initialisation; no pre-trained backbone offline). Flips are drawn from
``(seed, epoch, dataset index)``, so they are the same in every run. The
generated training split is reduced to images whose own padded shape is the
most common one (all landscape at 96x128 by default): every batch of 2 or 4
then has the same padded input size, and (c) differs from (b) by its loss
statistics only, not by its padding. The lr is ``--lr`` from the second
iteration on; the first uses 0.001 x lr, the shortest linear warm-up mmengine's
schedule allows (``--warmup-iters 2``), in all runs alike.

Compared: per iteration, rank 0's logged losses and the gradient norm after the
cross-rank average (the distributed run logs rank 0 only); at the end, every
trainable parameter, the SGD momentum buffers, and both ranks' GHM buffers
(from the run's ``latest.ckpt``). Parameter differences are reported as

- ``max_abs``: the largest ``|a - b|`` over all parameters;
- ``max_rel``: the largest, over parameter tensors, of ``max|a - b| / max|a|``;
- ``rel_to_update``: ``||a - b|| / ||a - init||`` over all parameters together
  (L2), the difference as a fraction of how far training moved the weights.

Output: ``--out`` (JSON, written atomically), launcher logs in
``WORK_DIR/launch_log`` (``workerlog.0``, ``workerlog.1``) and
``WORK_DIR/launch.out``. Exit status: 0 when (a) and (b) agree within
``TOLERANCE`` and the control differs; 1 when the launcher fails (the message
names its logs); 3 when the comparison fails (the JSON is still written).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from paddle_impl.engine.runtime import configure_cpu

# MKL fixes its kernel choice at its first call: the same settings as the training script's,
# before Paddle is imported, so this process computes as the launched ones do.
configure_cpu()

import paddle  # noqa: E402

from common.atomic_write import write_json  # noqa: E402
from align.ghm.sides import PaddleSide, summed_terms  # noqa: E402
from bench.distributed_run import (BATCH_PER_PROCESS, WARMUP_ITERS, WORLD_SIZE, LaunchError,  # noqa: E402
                                   run_distributed)
from bench.machine import load_average  # noqa: E402
from common.arguments import non_negative, parse_size, positive, positive_float  # noqa: E402
from paddle_impl.config import get_config  # noqa: E402
from paddle_impl.data.dataset import CocoDetection, build_dataloader  # noqa: E402
from paddle_impl.data.tiny_coco import generate  # noqa: E402
from paddle_impl.data.transforms import Collate  # noqa: E402
from paddle_impl.engine import checkpoint as ckpt  # noqa: E402
from paddle_impl.engine.lr_schedule import WarmupMultiStepLR  # noqa: E402
from paddle_impl.engine.optimizer import SGD  # noqa: E402
from paddle_impl.engine.train_step import LossForward  # noqa: E402
from paddle_impl.data.coco_layout import coco_paths  # noqa: E402
from paddle_impl.engine.trainer import seed_everything  # noqa: E402
from paddle_impl.engine.weights import set_ghm_buffers  # noqa: E402
from paddle_impl.model.detector import RetinaNet  # noqa: E402

# (a) vs (b): relative differences allowed for losses, gradient norms, parameters and
# buffers. float32 rounding of a different summation order would stay near 1e-7 to 1e-6;
# a missing gradient average changes the update by a factor of 2.
TOLERANCE = 1e-5
LOSS_KEYS = ("loss", "loss_cls", "loss_bbox")


# Data --------------------------------------------------------------------------------------------

def prepare_data(root: Path, train_images: int, seed: int, scale: tuple[int, int]) -> dict[str, Any]:
    """Generate the tiny COCO at ``root`` and keep the training images of the most common padded shape.

    ``scale`` is ``(w, h)``; the images are drawn around ``h x w``. Returns
    ``{'root', 'train_images', 'pad_shape', 'dropped'}``.
    """
    w, h = scale
    generate(root, train=train_images, val=1, seed=seed, size=(h, w), overwrite=True)
    ann_file = root / "annotations" / "instances_train2017.json"
    dataset = CocoDetection(str(ann_file), str(root / "train2017"), train=True, seed=seed,
                            scale=scale, flip=False)
    collate = Collate()
    pad_shapes = {}
    for index, record in enumerate(dataset.records):
        img_h, img_w = dataset[index]["img_shape"]
        pad_shapes[record.img_id] = (collate.padded(img_h), collate.padded(img_w))
    common, _ = Counter(pad_shapes.values()).most_common(1)[0]
    keep = {img_id for img_id, shape in pad_shapes.items() if shape == common}
    data = json.loads(ann_file.read_text())
    data["images"] = [img for img in data["images"] if img["id"] in keep]
    data["annotations"] = [ann for ann in data["annotations"] if ann["image_id"] in keep]
    write_json(ann_file, data)
    return {"root": str(root), "train_images": len(keep), "pad_shape": list(common),
            "dropped": sorted(set(pad_shapes) - keep)}


def load_train_set(coco: Path, seed: int, scale: tuple[int, int]) -> CocoDetection:
    """The training set exactly as ``Trainer`` builds it (random flips keyed by the seed)."""
    paths = coco_paths(coco)
    return CocoDetection(paths["train_ann"], paths["train_img"], train=True, seed=seed, scale=scale)


def rank_loaders(train_set: CocoDetection, seed: int) -> list:
    """Each rank's training loader, as ``Trainer`` builds it on that rank."""
    return [build_dataloader(train_set, batch_size=BATCH_PER_PROCESS, num_workers=0, seed=seed,
                             rank=rank, world_size=WORLD_SIZE) for rank in range(WORLD_SIZE)]


def lockstep(loaders: Sequence, iters: int) -> Iterator[list[dict[str, Any]]]:
    """Per global iteration, the batch of every rank, epoch after epoch as ``Trainer.run`` draws them."""
    done, epoch = 0, 0
    while done < iters:
        for loader in loaders:
            loader.batch_sampler.set_epoch(epoch)
        for batches in zip(*loaders):
            positions = {(k.epoch, k.batch) for b in batches for k in b["keys"]}
            if len(positions) != 1:
                raise RuntimeError(f"ranks out of step: batches at (epoch, batch) {sorted(positions)}")
            yield list(batches)
            done += 1
            if done >= iters:
                return
        epoch += 1


def iters_per_epoch(train_set: CocoDetection, seed: int) -> int:
    return len(rank_loaders(train_set, seed)[0])


# (b) and (c): in this process --------------------------------------------------------------------

def build_training(lr: float, seed: int, epochs: int, ipe: int) -> PaddleSide:
    """Model, loss layer, optimizer and schedule as ``Trainer.__init__`` builds them on every rank,
    as a training side; the schedule is the distributed run's (its iterations per epoch, total batch 4)."""
    cfg = get_config()
    cfg["optimizer"]["max_epochs"] = epochs
    cfg["optimizer"]["warmup_iters"] = WARMUP_ITERS
    cfg["optimizer"]["milestones"] = [epochs + 1]
    seed_everything(seed)
    model = RetinaNet.from_config(cfg)
    model.train()
    schedule = WarmupMultiStepLR.from_config(ipe, WORLD_SIZE * BATCH_PER_PROCESS, cfg=cfg, base_lr=lr)
    return PaddleSide(model, SGD(model, lr=lr, cfg=cfg), schedule, loss_forward=LossForward(model),
                      terms=summed_terms)


def data_parallel_step(side: PaddleSide, batches: Sequence[dict[str, Any]], ghm: list[dict[str, np.ndarray]],
                       reduce: str = "mean") -> dict[str, Any]:
    """One optimizer step of ``len(batches)`` emulated ranks, rank ``r`` on ``batches[r]``.

    Each rank's loss runs with its own GHM buffers ``ghm[r]`` (updated in
    place in the list) and the loss composition of ``Trainer._step``; its
    gradients are kept aside. The gradients are then summed in rank order and,
    with ``reduce='mean'``, divided by the number of ranks (with ``'sum'``
    not: the control). Then the side's step: clip + SGD and the schedule step, as ``Trainer._step``.

    Returns ``{'lr', 'grad_norm', 'ranks': [{'loss', 'loss_cls', 'loss_bbox'}...]}``.
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    model, loss_forward = side.model, side.loss_forward
    params = [(name, p) for name, p in side.optimizer.parameters().items() if not p.stop_gradient]
    per_rank_grads, ranks = [], []

    def keep_rank(rank: int, losses: dict[str, float]) -> None:
        ghm[rank] = ckpt.ghm_buffers(model.state_dict())
        per_rank_grads.append({name: p.grad.clone() for name, p in params if p.grad is not None})
        ranks.append(losses)

    # Every rank but the last: its forward and backward, gradients kept aside.
    for rank, batch in enumerate(batches[:-1]):
        set_ghm_buffers(model, ghm[rank])
        losses = loss_forward(batch["images"], batch["gt_bboxes"], batch["gt_labels"], batch["pad_shapes"])
        loss_cls, loss_bbox = sum(losses["loss_cls"]), sum(losses["loss_bbox"])
        total = loss_cls + loss_bbox
        total.backward()
        keep_rank(rank, {"loss": float(total), "loss_cls": float(loss_cls), "loss_bbox": float(loss_bbox)})
        side.optimizer.clear_grad()

    def reduce_gradients() -> None:
        # The last rank's gradients stay in place: their slots receive the reduced values.
        keep_rank(len(batches) - 1, {})
        names = set(per_rank_grads[0])
        if any(set(g) != names for g in per_rank_grads):
            raise RuntimeError("the ranks' losses reached different parameters")
        # Dividing by a power of two is exact, so (g0 + g1) / 2 equals DataParallel's g0/2 + g1/2.
        scale = 1.0 / len(batches) if reduce == "mean" else 1.0
        with paddle.no_grad():
            for name, p in params:
                if name not in names:
                    continue
                reduced = per_rank_grads[0][name]
                for grads in per_rank_grads[1:]:
                    reduced = reduced + grads[name]
                if scale != 1.0:
                    reduced = reduced * scale
                paddle.assign(reduced, output=p.grad)

    # The last rank's step: its forward and backward, the reduction, the update.
    set_ghm_buffers(model, ghm[-1])
    step = side.train_step(batches[-1], after_backward=reduce_gradients)
    ranks[-1] = dict(step.losses)
    return {"lr": step.lr, "grad_norm": step.grad_norm, "ranks": ranks}


def run_emulation(train_set: CocoDetection, iters: int, lr: float, seed: int, epochs: int,
                  mode: str = "ranks", reduce: str = "mean") -> dict[str, Any]:
    """(b) with ``mode='ranks'`` (two emulated ranks; ``reduce`` as in :func:`data_parallel_step`),
    (c) with ``mode='joined'`` (one process, the two ranks' batches as one batch of 4).

    Returns ``{'wall_s', 'iterations': [step records with 'keys', 'flips'], 'params', 'init_params',
    'ghm': [per-rank buffers], 'momentum'}`` (numpy arrays by name).
    """
    started = time.perf_counter()
    loaders = rank_loaders(train_set, seed)
    side = build_training(lr, seed, epochs, len(loaders[0]))
    model = side.model
    init = {name: p.numpy().copy() for name, p in model.named_parameters()}
    collate = Collate()
    ghm = [ckpt.ghm_buffers(model.state_dict()) for _ in range(WORLD_SIZE if mode == "ranks" else 1)]
    records = []
    for batches in lockstep(loaders, iters):
        keys = [[tuple(k) for k in b["keys"]] for b in batches]
        flips = [list(b["flips"]) for b in batches]
        if mode == "joined":
            samples = [train_set[k] for b in batches for k in b["keys"]]
            batches = [collate.batch(samples)]
        record = data_parallel_step(side, batches, ghm, reduce)
        record["keys"], record["flips"] = keys, flips
        records.append(record)
    return {"wall_s": time.perf_counter() - started, "iterations": records,
            "params": {name: p.numpy().copy() for name, p in model.named_parameters()},
            "init_params": init, "ghm": ghm,
            "momentum": {k: v.numpy().copy() for k, v in side.optimizer.momentum_buffers().items()}}


# Comparison --------------------------------------------------------------------------------------

def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def tensor_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray],
                init: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Differences of two name -> array maps over their common names (see the module docstring)."""
    names = sorted(set(a) & set(b))
    if set(a) != set(b):
        raise ValueError(f"different tensors: {sorted(set(a) ^ set(b))[:5]}")
    max_abs, max_rel, worst, diff_sq, move_sq, identical = 0.0, 0.0, None, 0.0, 0.0, True
    for name in names:
        x, y = np.asarray(a[name], np.float64), np.asarray(b[name], np.float64)
        d = np.abs(x - y)
        identical = identical and bool(np.array_equal(a[name], b[name]))
        m = float(d.max()) if d.size else 0.0
        scale = float(np.abs(x).max()) if x.size else 0.0
        rel = m / scale if scale > 0 else (0.0 if m == 0 else math.inf)
        max_abs = max(max_abs, m)
        if rel > max_rel:
            max_rel, worst = rel, name
        diff_sq += float((d * d).sum())
        if init is not None:
            moved = x - np.asarray(init[name], np.float64)
            move_sq += float((moved * moved).sum())
    out = {"tensors": len(names), "bit_identical": identical, "max_abs": max_abs, "max_rel": max_rel,
           "max_rel_tensor": worst}
    if init is not None:
        out["update_norm"] = math.sqrt(move_sq)
        out["rel_to_update"] = math.sqrt(diff_sq) / math.sqrt(move_sq) if move_sq > 0 else math.inf
    return out


def compare_distributed(dist_run: dict[str, Any], emu: dict[str, Any]) -> dict[str, Any]:
    """(a) against an emulation: rank 0's per-iteration values, final weights, buffers."""
    per_iter = []
    for rec, step in zip(dist_run["log"], emu["iterations"]):
        row = {"iter": rec["iter"], "lr_equal": rec["lr"] == step["lr"],
               "grad_norm_rel": _rel(rec["grad_norm"], step["grad_norm"])}
        row.update({f"{k}_rel": _rel(rec[k], step["ranks"][0][k]) for k in LOSS_KEYS})
        per_iter.append(row)
    params_a = {k: dist_run["model_state"][k] for k in emu["params"]}
    ghm = [tensor_diff(dist_run["ghm"][r], emu["ghm"][r]) for r in range(WORLD_SIZE)]
    momentum = tensor_diff(dist_run["momentum"], emu["momentum"])
    params = tensor_diff(params_a, emu["params"], emu["init_params"])
    worst_iter = max(max(r[f"{k}_rel"] for k in (*LOSS_KEYS, "grad_norm")) for r in per_iter)
    worst = max(worst_iter, params["max_rel"], momentum["max_rel"], *(g["max_rel"] for g in ghm))
    return {"per_iteration": per_iter, "params": params, "momentum": momentum, "ghm_per_rank": ghm,
            "max_rel_any": worst, "lr_equal": all(r["lr_equal"] for r in per_iter),
            "within_tolerance": bool(worst <= TOLERANCE and all(r["lr_equal"] for r in per_iter)),
            "tolerance": TOLERANCE}


def iteration_table(dist_run: dict[str, Any], emu: dict[str, Any], joined: dict[str, Any] | None,
                    control: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per iteration: the images of each rank and the losses of (a), (b), (c) and the control."""
    rows = []
    for i, rec in enumerate(dist_run["log"]):
        step = emu["iterations"][i]
        row = {
            "iter": rec["iter"], "lr": rec["lr"],
            "keys_per_rank": step["keys"], "flips_per_rank": step["flips"],
            "a_distributed_rank0": {**{k: rec[k] for k in LOSS_KEYS}, "grad_norm": rec["grad_norm"],
                                    "param_rank_spread": rec.get("param_rank_spread")},
            "b_emulation": {"rank0": step["ranks"][0], "rank1": step["ranks"][1],
                            "mean_of_ranks": {k: float(np.mean([r[k] for r in step["ranks"]]))
                                              for k in LOSS_KEYS},
                            "grad_norm": step["grad_norm"]},
        }
        if joined is not None:
            j = joined["iterations"][i]
            row["c_one_process_batch4"] = {**j["ranks"][0], "grad_norm": j["grad_norm"]}
        if control is not None:
            row["control_summed_grad_norm"] = control["iterations"][i]["grad_norm"]
        rows.append(row)
    return rows


# Main --------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.data_parallel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=positive, default=4, help="training iterations (default %(default)s)")
    p.add_argument("--lr", type=positive_float, default=0.01, help="learning rate (default %(default)s)")
    p.add_argument("--seed", type=non_negative, default=0)
    p.add_argument("--scale", type=parse_size, default=(128, 96),
                   help="resize scale WxH (default 128x96)")
    p.add_argument("--train-images", type=positive, default=40,
                   help="training images generated before the padded-shape filter (default %(default)s)")
    p.add_argument("--timeout", type=positive_float, default=1200, help="seconds allowed for the launched run")
    p.add_argument("--work-dir", type=Path, default=Path("build/data_parallel"))
    p.add_argument("--out", type=Path, default=Path("reports/data_parallel.json"))
    args = p.parse_args(argv)
    if args.iters < 1 or args.train_images < 8 or not args.lr > 0 or not args.timeout > 0:
        p.error("--iters must be >= 1, --train-images >= 8, --lr and --timeout > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = load_average()
    t0 = time.perf_counter()
    data = prepare_data(args.work_dir / "data", args.train_images, args.seed, args.scale)
    coco = Path(data["root"])
    train_set = load_train_set(coco, args.seed, args.scale)
    ipe = iters_per_epoch(train_set, args.seed)
    epochs = -(-args.iters // ipe)
    data_s = time.perf_counter() - t0
    print(f"[data_parallel] {data['train_images']} training images padded to {data['pad_shape']}, "
          f"{ipe} iterations per epoch; launching 2 processes", file=sys.stderr)
    try:
        dist_run = run_distributed(coco, args.work_dir, args.iters, args.lr, args.seed, args.scale,
                                   epochs, timeout=args.timeout)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"[data_parallel] (a) done in {dist_run['wall_s']:.1f} s; emulating", file=sys.stderr)
    emu = run_emulation(train_set, args.iters, args.lr, args.seed, epochs, mode="ranks")
    control = run_emulation(train_set, args.iters, args.lr, args.seed, epochs, mode="ranks", reduce="sum")
    joined = run_emulation(train_set, args.iters, args.lr, args.seed, epochs, mode="joined")

    a_vs_b = compare_distributed(dist_run, emu)
    # Each process keeps its own GHM statistics: the two ranks' buffers must differ.
    a_vs_b["b_ghm_rank0_vs_rank1"] = tensor_diff(emu["ghm"][0], emu["ghm"][1])
    a_vs_control = compare_distributed(dist_run, control)
    a_vs_c = {
        "params": tensor_diff({k: dist_run["model_state"][k] for k in joined["params"]}, joined["params"],
                              joined["init_params"]),
        "momentum": tensor_diff(dist_run["momentum"], joined["momentum"]),
        "loss_rel_per_iteration": [
            {"iter": i + 1, **{k: _rel(float(np.mean([r[k] for r in s["ranks"]])), j["ranks"][0][k])
                               for k in LOSS_KEYS}, "grad_norm": _rel(s["grad_norm"], j["grad_norm"])}
            for i, (s, j) in enumerate(zip(emu["iterations"], joined["iterations"]))],
        "note": "(c) vs the mean of (b)'s two rank losses; params and momentum vs (a)",
    }
    control_detected = a_vs_control["max_rel_any"] > 100 * TOLERANCE
    ok = a_vs_b["within_tolerance"] and control_detected
    report = {
        "what": "2 CPU processes x 2 images (paddle.distributed.launch, gloo, DataParallel) vs a "
                "single-process emulation (per-rank GHM state, averaged gradients) and vs 1 process x 4 images",
        "paddle": paddle.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "load_average_before": load_before, "load_average_after": load_average(),
        "settings": {"iters": args.iters, "lr": args.lr, "warmup_iters": WARMUP_ITERS, "seed": args.seed,
                     "scale": list(args.scale), "world_size": WORLD_SIZE,
                     "batch_per_process": BATCH_PER_PROCESS, "iters_per_epoch": ipe, "epochs": epochs,
                     "data": data},
        "command_distributed": " ".join(dist_run["command"]),
        "launch_logs": str(args.work_dir / "launch_log"),
        "wall_s": {"data": data_s, "a_distributed": dist_run["wall_s"], "b_emulation": emu["wall_s"],
                   "control_summed": control["wall_s"], "c_batch4": joined["wall_s"]},
        "iterations": iteration_table(dist_run, emu, joined, control),
        "a_vs_b": a_vs_b,
        "a_vs_c": a_vs_c,
        "a_vs_control_summed_gradients": {k: a_vs_control[k] for k in ("params", "max_rel_any")},
        "ok": ok,
    }
    write_json(args.out, report, indent=1)
    p = a_vs_b["params"]
    print(f"[data_parallel] (a) vs (b): params bit-identical {p['bit_identical']}, max_rel {p['max_rel']:.3g}, "
          f"worst relative difference of anything {a_vs_b['max_rel_any']:.3g} (tolerance {TOLERANCE:g})\n"
          f"[data_parallel] (a) vs (c): params max_rel {a_vs_c['params']['max_rel']:.3g}, "
          f"rel_to_update {a_vs_c['params']['rel_to_update']:.3g}\n"
          f"[data_parallel] control (summed gradients) vs (a): {a_vs_control['max_rel_any']:.3g}\n"
          f"[data_parallel] wrote {args.out}", file=sys.stderr)
    if not ok:
        print("error: the distributed run does not match its emulation (or the control does not differ); "
              f"see {args.out}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
