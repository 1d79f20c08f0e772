"""Train GHM RetinaNet with mmdet 3.3.0's schedule, resumably, on one or several processes.

Usage::

    python -m paddle_impl.train --coco DIR --work-dir DIR [--epochs 12] [--batch-size 2]
        [--lr auto|FLOAT] [--max-iters N] [--resume [CKPT] [--allow-config-change]]
        [--init-backbone r50.pdparams]
        [--init WEIGHTS.pdparams|mmdet.pth] [--eval-interval 1] [--eval-backend pycocotools|faster-coco-eval]
        [--num-workers 2] [--seed 0]
        [--mmdet-log FILE] [--scale WxH] [--warmup-iters N] [--milestones 8,11]
        [--ckpt-interval-iters K] [--keep-checkpoints 3] [--reports DIR] [--report-only] [--no-progress]
    python -m paddle_impl.launch --nproc N -- ...          # N CPU processes (gloo)
    python -m paddle_impl.launch --gpus 0,1,2,3 -- ...     # 4 GPUs (paddlepaddle-gpu)
    python -m paddle_impl.launch --nnodes 2 --node-rank R --master HOST:PORT --gpus 0,1,2,3 -- ...
                                                           # on each of 2 machines (paddle_impl.launch)

``--coco DIR`` holds ``train2017/``, ``val2017/`` and
``annotations/instances_{train,val}2017.json``. Without it a tiny synthetic
COCO is generated into ``WORK_DIR/tiny_coco`` and a SMOKE schedule runs
(2 epochs, images resized to fit 320x192), labelled as such in the logs and
the report.

Schedule (``get_config()['optimizer']``): SGD momentum 0.9, weight decay 1e-4,
gradient clipping at L2 norm 35; linear warm-up from 0.001x over the first 500
iterations; lr x0.1 after epochs 8 and 11; 12 epochs. The lr is 0.01 for a
TOTAL batch of 16 images (mmdet's 8 GPUs x 2) and, with ``--lr auto``, scaled
linearly to the real total batch ``batch_size x world_size``: 0.0025 for one
process with 2 images, 0.005 for 4 GPUs x 1 image... (mmengine's
``auto_scale_lr`` rule). A float ``--lr`` is used as is.

Distributed: under ``paddle.distributed.launch`` each process trains on its
share of every epoch (the distributed sampler by rank), gradients are averaged
by ``paddle.DataParallel``, and each process keeps its own GHM momentum
statistics, as mmdet's distributed training does (its DDP does not broadcast
buffers). Rank 0 alone logs, checkpoints (gathering every rank's GHM state and
RNG state into the checkpoint, so a resume restores each rank's own) and
reports. Logged losses are rank 0's. Evaluation is shared: each process
predicts its own share of the validation set (every image exactly once across
the processes, no padding; shares may differ by one image), the detections
are gathered to rank 0, which restores dataset order, scores them and writes
the results while the others wait for it; the numbers and detections are those
of a one-process evaluation.

Outputs in ``--work-dir``:

- ``log.jsonl``: one line per iteration: ``iter`` (global, 1-based), ``epoch``
  (1-based), ``iter_in_epoch``, ``lr``, ``loss_cls`` / ``loss_bbox`` (sums over
  the 5 FPN levels), ``loss_cls_levels`` / ``loss_bbox_levels`` (per level),
  ``loss`` (total), ``grad_norm`` (L2, before clipping, after the cross-rank
  average), ``time`` / ``data_time`` (seconds for this iteration / waiting for
  its batch), ``eta_s`` and ``eta``; with several processes also
  ``param_rank_spread``, the largest difference across ranks of the parameters'
  float64 sum and sum of squares (0 when every rank holds the same weights).
- ``eval.jsonl``: one line per evaluation: ``epoch``, ``iter`` and the 12 COCO
  box metrics named as mmdet's ``CocoMetric`` (``bbox_mAP`` ...), ``num_detections``;
  ``eval_time`` (seconds, rank 0, prediction to metrics), ``predict_time_per_rank``
  and ``images_per_rank`` (each process's prediction seconds and image count).
  The metrics are computed by pycocotools, as mmdet does, or with ``--eval-backend
  faster-coco-eval`` by that library's C++ code, with identical numbers
  (:mod:`paddle_impl.evaluation.coco_eval`); ``run.json`` records which.
- ``latest.ckpt``: full training state (see :mod:`paddle_impl.engine.checkpoint`),
  rewritten atomically at the end of every epoch (before its evaluation), every
  ``--ckpt-interval-iters`` iterations and when training stops; ``epoch_{E}.pdparams``: model weights
  after epoch E, of the last ``--keep-checkpoints`` K epochs only (default 3; 0 keeps
  all): once epoch E's file is written, rank 0 removes ``epoch_{E-K}.pdparams`` and
  older ones of the work dir; ``model_final.pdparams``; ``val_results.bbox.json``: the last
  evaluation's detections in COCO format.
- ``train.html`` (copied to ``--reports``): loss, lr and gradient-norm curves and
  AP per epoch, overlaid with an mmdet json log given by ``--mmdet-log``.

``--resume`` continues from ``WORK_DIR/latest.ckpt`` (or the given file) at
the exact iteration, batch and GHM state it holds; log lines written after
that checkpoint by the interrupted run are dropped. Without a checkpoint to
resume, training starts from scratch (as mmengine's ``resume=True`` does).
Every checkpoint records the options that change what training computes
(``--coco``, ``--epochs``, ``--batch-size``, ``--lr``, ``--warmup-iters``,
``--milestones``, ``--scale``, ``--seed``, ``--init``, ``--init-backbone``, as
their effective values: an omitted default counts as spelled out). A resume
whose command differs in any of them stops, before anything is written, with
one line naming each such option with both values; ``--allow-config-change``
continues with the new values instead (the lr schedule at the saved iteration
under the new schedule, a batch position past the new epoch's end at the next
epoch) and records each change, with its iteration, in ``run.json``
(``config_changes``, kept across resumes) and ``train.html``. A checkpoint
written before these records resumes without the comparison.

Faults: the COCO folders, every image file the run will read and the
writability of ``--work-dir`` and ``--reports`` are checked before anything is
written. An image that does not decode (any number of workers), a failed write
or a NaN/infinite loss stops the run with one line naming the file, path or
iteration; a one-process run saves its last complete iteration first (not
for a non-finite loss). Weights and checkpoints given by the user are read
without unpickling anything but arrays and containers
(:mod:`paddle_impl.engine.safe_load`). With several processes every rank must
start at the same iteration: a ``--resume`` whose checkpoint some rank does not
see (a node without the shared ``--work-dir``) stops every rank with one line
naming them. A rank that dies is named by ``python -m paddle_impl.launch``.

Exit status: 0 on success, 2 on bad input or a fault (one line, the file or
option first; ``-v`` or ``GHM_TRACEBACK=1`` adds the traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from common.arguments import non_negative, parse_size, positive
from common.errors import InputError
from paddle_impl.arguments import add_eval_backend, epochs_list, eval_backend, learning_rate
from paddle_impl.errors import run_command

# Quiet the C++ logs of Paddle before it is imported.
os.environ.setdefault("GLOG_minloglevel", "2")


# Arguments ---------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m paddle_impl.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--coco", help="COCO root (train2017/, val2017/, annotations/); "
                                  "omitted: generate a tiny COCO and run a smoke schedule")
    p.add_argument("--work-dir", required=True, help="logs, checkpoints and report go here")
    p.add_argument("--epochs", type=positive, help="default 12 (smoke: 2)")
    p.add_argument("--batch-size", type=positive, default=2, help="images per process (default 2)")
    p.add_argument("--lr", type=learning_rate, default="auto",
                   help="'auto' (0.01 x total batch / 16, default) or a number")
    p.add_argument("--warmup-iters", type=positive, help="linear warm-up length (default 500)")
    p.add_argument("--milestones", type=epochs_list,
                   help="epochs after which the lr drops x0.1, e.g. 8,11 (the default); "
                        "give epochs beyond --epochs for no drop")
    p.add_argument("--max-iters", type=positive, help="stop after this many global iterations")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from WORK_DIR/latest.ckpt, or from CKPT")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue although the training options differ from the "
                        "checkpoint's, and record the changes in run.json")
    p.add_argument("--init-backbone", help="backbone weights (.pdparams from "
                                           "`python -m weights_convert torchvision-resnet50`)")
    p.add_argument("--init", help="whole-model weights: Paddle .pdparams or an mmdet .pth checkpoint")
    p.add_argument("--eval-interval", type=non_negative, default=1,
                   help="evaluate every N epochs (0: only when training ends; default 1)")
    add_eval_backend(p)
    p.add_argument("--ckpt-interval-iters", type=non_negative, default=0,
                   help="also checkpoint every K iterations (0: only per epoch)")
    p.add_argument("--keep-checkpoints", type=non_negative, default=3, metavar="K",
                   help="keep the epoch_E.pdparams of the last K epochs (0: all; default 3); "
                        "latest.ckpt and model_final.pdparams are always kept")
    p.add_argument("--num-workers", type=non_negative, default=2)
    p.add_argument("--seed", type=non_negative, default=0)
    p.add_argument("--scale", type=parse_size, help="resize scale WxH for training and evaluation "
                                               "(default 1333x800; smoke 320x192)")
    p.add_argument("--mmdet-log", help="mmdet json log (vis_data/scalars.json) to overlay in the report")
    p.add_argument("--reports", help="also copy train.html into this folder")
    p.add_argument("--report-only", action="store_true",
                   help="only (re)write the report from WORK_DIR's logs")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="with an error, also print its Python traceback (or set GHM_TRACEBACK=1)")
    return p.parse_args(argv)


# Program -----------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """Parse, build, run; exit status 0, or 2 with one line for bad input or a fault."""
    args = parse_args(argv)
    return run_command(lambda: _run(args), argv)


def _run(args: argparse.Namespace) -> int:
    eval_backend(args)
    import paddle.distributed as dist

    from paddle_impl.engine.report import read_mmdet_log, render_report
    from paddle_impl.engine.trainer import Trainer
    from paddle_impl.engine.weights import convert_torch_checkpoint

    if args.report_only:
        work_dir = Path(args.work_dir)
        if not (work_dir / "log.jsonl").is_file():
            raise InputError(f"--report-only: no log.jsonl in {work_dir}")
        mmdet_log = read_mmdet_log(args.mmdet_log) if args.mmdet_log else None
        run_file = work_dir / "run.json"
        run = json.loads(run_file.read_text()) if run_file.is_file() else {}
        print(render_report(work_dir, args.reports, mmdet_log, run))
        return 0
    if dist.get_world_size() > 1:
        dist.init_parallel_env()
    with tempfile.TemporaryDirectory(prefix="ghm-init-") as tmp:
        # An mmdet .pth goes through the converter's own command: no torch in the trainer.
        init_files = {flag: convert_torch_checkpoint(value, f"--{flag.replace('_', '-')}", tmp)
                      for flag in ("init", "init_backbone") if (value := getattr(args, flag))}
        Trainer(args, init_files).run()
    return 0


def run_program() -> int:
    """``python -m paddle_impl.train`` and the ``ghm-train`` command: :func:`main` with the
    CPU runtime settings of a training process.

    Only as the training program: the setting trades correctly rounded float32
    division for speed (see :mod:`paddle_impl.engine.runtime`), which a process
    that imports this module to compare numbers must not inherit. MKL fixes
    its kernel choice at its first call, so this precedes importing Paddle.
    """
    from paddle_impl.engine.runtime import configure_cpu

    configure_cpu()
    return main()


if __name__ == "__main__":
    sys.exit(run_program())
