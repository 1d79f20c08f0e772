"""Overfitting check: train on a few tiny-COCO images and evaluate on the same images.

    python -m bench.overfit [--images 4] [--iters 600] [--lr 0.01] [--decay-at 0.75] [--scale 480x320]
                            [--work-dir build/overfit] [--out reports/overfit.json]

A detector whose model, losses, targets and optimizer are right can learn a
handful of images by heart; one with a broken piece (a wrong box encoding, a
mislabelled class, a frozen head) stalls. This runs the real training entry
point (``paddle_impl.train``: the config's model, GHM-C / GHM-R, SGD with
clipping, warm-up) on the first ``--images`` training images of the tiny
synthetic COCO, whose validation split is made a copy of that training split,
and reports the 12 pycocotools numbers on it with the wall time.

The weights start from Paddle's default initialisation: no ImageNet backbone
is available offline (``--init-backbone`` takes one). The stem and stage 1
stay frozen and BN statistics stay fixed, as in the reference config, so the
network has to fit through the trainable layers only. The learning rate is
the reference 0.01 without the linear batch scaling (fewer than 16 images per
batch here would make it 8x smaller and the run 8x longer), with a short
warm-up and, as in the reference schedule, one x0.1 step late in training
(``--decay-at``, a fraction of the iterations): at a constant 0.01 the AP of
the last iterations swings by several points from one evaluation to the next.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from common.arguments import non_negative, positive, positive_float


def make_dataset(root: Path, images: int, seed: int) -> Path:
    """Tiny COCO at ``root`` with ``images`` training images and val = a copy of train."""
    from paddle_impl.data.tiny_coco import generate

    generate(root, train=images, val=1, seed=seed, overwrite=True)
    shutil.rmtree(root / "val2017")
    shutil.copytree(root / "train2017", root / "val2017")
    shutil.copyfile(root / "annotations" / "instances_train2017.json",
                    root / "annotations" / "instances_val2017.json")
    return root


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.overfit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=positive, default=4, help="training images (default %(default)s)")
    p.add_argument("--iters", type=positive, default=600, help="training iterations (default %(default)s)")
    p.add_argument("--lr", type=positive_float, default=0.01, help="base learning rate (default %(default)s)")
    p.add_argument("--warmup-iters", type=non_negative, default=50)
    p.add_argument("--decay-at", type=positive_float, default=0.75,
                   help="fraction of the iterations after which the lr drops x0.1 (1: never; "
                        "default %(default)s)")
    p.add_argument("--scale", default="480x320", help="resize scale WxH (default %(default)s: the images' own)")
    p.add_argument("--eval-every", type=non_negative, default=0,
                   help="also evaluate every N epochs (an epoch is images / 2 iterations; 0: only at the end)")
    p.add_argument("--seed", type=non_negative, default=0)
    p.add_argument("--init-backbone", help="backbone .pdparams (default: random initialisation)")
    p.add_argument("--work-dir", type=Path, default=Path("build/overfit"))
    p.add_argument("--out", type=Path, default=Path("reports/overfit.json"))
    args = p.parse_args(argv)
    if args.images < 2 or args.iters < 1:
        p.error("--images must be at least 2 (one batch of 2) and --iters at least 1")
    if not 0 < args.decay_at <= 1:
        p.error(f"--decay-at must be in (0, 1], got {args.decay_at}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from paddle_impl.engine.runtime import configure_cpu

    # As the training program does, before Paddle's MKL makes its first call.
    configure_cpu()
    from paddle_impl import train
    from common.atomic_write import write_json

    root = make_dataset(args.work_dir / "data", args.images, args.seed)
    run_dir = args.work_dir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    iters_per_epoch = args.images // 2
    epochs = -(-args.iters // iters_per_epoch)
    # Milestones count whole epochs; past the last epoch there is no decay.
    decay_epoch = max(1, round(args.decay_at * epochs)) if args.decay_at < 1 else epochs + 1
    train_argv = ["--coco", str(root), "--work-dir", str(run_dir), "--epochs", str(epochs),
                  "--max-iters", str(args.iters), "--lr", str(args.lr),
                  "--warmup-iters", str(args.warmup_iters), "--milestones", str(decay_epoch),
                  "--scale", args.scale, "--seed", str(args.seed), "--num-workers", "0",
                  "--eval-interval", str(args.eval_every), "--ckpt-interval-iters", "0",
                  "--no-progress"]
    if args.init_backbone:
        train_argv += ["--init-backbone", args.init_backbone]
    start = time.perf_counter()
    status = train.main(train_argv)
    seconds = time.perf_counter() - start
    if status != 0:
        return status
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines() if line.strip()]
    if not evals:
        print(f"error: no evaluation in {run_dir / 'eval.jsonl'}", file=sys.stderr)
        return 1
    final = evals[-1]
    losses = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    result = {
        "images": args.images, "iterations": args.iters, "lr": args.lr, "scale": args.scale,
        "lr_decay_after_iteration": decay_epoch * iters_per_epoch if args.decay_at < 1 else None,
        "seed": args.seed, "init_backbone": args.init_backbone, "seconds": round(seconds, 1),
        "first_loss": losses[0].get("loss") if losses else None,
        "last_loss": losses[-1].get("loss") if losses else None,
        "final": final, "evaluations": evals,
    }
    write_json(args.out, result, indent=2)
    print(f"overfit: {args.images} images, {args.iters} iterations, {seconds:.0f} s; "
          f"loss {result['first_loss']} -> {result['last_loss']}; "
          f"bbox_mAP {final.get('bbox_mAP')} bbox_mAP_50 {final.get('bbox_mAP_50')}; "
          f"report {run_dir / 'train.html'}; {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
