"""Train GHM RetinaNet with mmdet 3.3.0's schedule, resumably, on one or several processes.

Usage::

    python -m paddle_impl.train --coco DIR --work-dir DIR [--epochs 12] [--batch-size 2]
        [--lr auto|FLOAT] [--max-iters N] [--resume [CKPT]] [--init-backbone r50.pdparams]
        [--init WEIGHTS.pdparams|mmdet.pth] [--eval-interval 1] [--num-workers 2] [--seed 0]
        [--mmdet-log FILE] [--scale WxH] [--warmup-iters N] [--milestones 8,11]
        [--ckpt-interval-iters K] [--reports DIR] [--report-only] [--no-progress]
    python -m paddle.distributed.launch --nproc_per_node N paddle_impl/train.py ...   # N CPU processes
    python -m paddle.distributed.launch --gpus 0,1,2,3 paddle_impl/train.py ...       # 4 GPUs (paddlepaddle-gpu)

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
RNG state into the checkpoint, so a resume restores each rank's own), evaluates
and reports. Logged losses are rank 0's.

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
  box metrics named as mmdet's ``CocoMetric`` (``bbox_mAP`` ...), ``num_detections``.
- ``latest.ckpt``: full training state (see :mod:`paddle_impl.checkpoint`),
  rewritten atomically at the end of every epoch (before its evaluation), every
  ``--ckpt-interval-iters`` iterations and when training stops; ``epoch_{E}.pdparams``: model weights
  after epoch E; ``model_final.pdparams``; ``val_results.bbox.json``: the last
  evaluation's detections in COCO format.
- ``train.html`` (copied to ``--reports``): loss, lr and gradient-norm curves and
  AP per epoch, overlaid with an mmdet json log given by ``--mmdet-log``.

``--resume`` continues from ``WORK_DIR/latest.ckpt`` (or the given file) at
the exact iteration, batch and GHM state it holds; log lines written after
that checkpoint by the interrupted run are dropped. Without a checkpoint to
resume, training starts from scratch (as mmengine's ``resume=True`` does).

Faults: the COCO folders, every image file the run will read and the
writability of ``--work-dir`` and ``--reports`` are checked before anything is
written. An image that does not decode (any number of workers), a failed write
or a NaN/infinite loss stops the run with one line naming the file, path or
iteration; a one-process run saves its last complete iteration first (not
for a non-finite loss). Weights and checkpoints given by the user are read
without unpickling anything but arrays and containers
(:mod:`paddle_impl.safe_load`).

Exit status: 0 on success, 2 on bad input or a fault (one line, the file or
option first; ``-v`` or ``GHM_TRACEBACK=1`` adds the traceback).
"""
from __future__ import annotations

import argparse
import base64
import datetime as _dt
import io
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# Quiet the C++ logs of Paddle before it is imported.
os.environ.setdefault("GLOG_minloglevel", "2")

if not __package__:
    # Run as a script (``paddle.distributed.launch paddle_impl/train.py``, which
    # cannot take ``-m``): import the package from the repository root rather
    # than this folder, whose module names (config, dataset...) are too generic.
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    sys.path.insert(0, os.path.dirname(_HERE))

if __name__ == "__main__":
    from paddle_impl.runtime import configure_cpu

    # Only as the training program: the setting trades correctly rounded float32
    # division for speed (see paddle_impl.runtime), which a process that imports
    # this module to compare numbers must not inherit. MKL fixes its kernel
    # choice at its first call, so this precedes importing Paddle.
    configure_cpu()

import paddle  # noqa: E402
import paddle.distributed as dist  # noqa: E402
from paddle import nn  # noqa: E402

from paddle_impl import checkpoint as ckpt  # noqa: E402
from paddle_impl import safe_load  # noqa: E402
from paddle_impl.atomic_write import (check_writable_dir, remove_stale_temp_files, write_json,  # noqa: E402
                                      write_text)
from paddle_impl.coco_eval import BBOX_METRIC_NAMES, detections_to_coco_json, evaluate_bbox  # noqa: E402
from paddle_impl.config import get_config  # noqa: E402
from paddle_impl.dataset import CocoDetection, build_dataloader, check_image_files  # noqa: E402
from paddle_impl.detector import RetinaNet  # noqa: E402
from paddle_impl.errors import (DataError, InputError, NonFiniteLossError, run_command,  # noqa: E402
                                write_error)
from paddle_impl.lr_schedule import WarmupMultiStepLR  # noqa: E402
from paddle_impl.optimizer import SGD, scaled_lr  # noqa: E402
from paddle_impl.postprocess import predict  # noqa: E402
from paddle_impl.samplers import resume_position  # noqa: E402

SMOKE_EPOCHS = 2
SMOKE_SCALE = (320, 192)  # (w, h) the image is resized to fit, keeping its ratio
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


# Arguments ---------------------------------------------------------------------------------------

def parse_scale(text: str) -> tuple[int, int]:
    """``WxH`` -> ``(w, h)``, mmdet's ``Resize(scale=(w, h))`` order."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH such as 1333x800, got {text!r}") from None
    if w < 32 or h < 32:
        raise argparse.ArgumentTypeError(f"scale {text!r} too small: both sides must be >= 32")
    return w, h


def _lr(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lr must be 'auto' or a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"--lr must be positive, got {text!r}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _epochs_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected epochs such as 8,11, got {text!r}") from None
    if values != sorted(values) or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"milestones must be increasing positive epochs, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m paddle_impl.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--coco", help="COCO root (train2017/, val2017/, annotations/); "
                                  "omitted: generate a tiny COCO and run a smoke schedule")
    p.add_argument("--work-dir", required=True, help="logs, checkpoints and report go here")
    p.add_argument("--epochs", type=_positive, help="default 12 (smoke: 2)")
    p.add_argument("--batch-size", type=_positive, default=2, help="images per process (default 2)")
    p.add_argument("--lr", type=_lr, default="auto",
                   help="'auto' (0.01 x total batch / 16, default) or a number")
    p.add_argument("--warmup-iters", type=_positive, help="linear warm-up length (default 500)")
    p.add_argument("--milestones", type=_epochs_list,
                   help="epochs after which the lr drops x0.1, e.g. 8,11 (the default); "
                        "give epochs beyond --epochs for no drop")
    p.add_argument("--max-iters", type=_positive, help="stop after this many global iterations")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from WORK_DIR/latest.ckpt, or from CKPT")
    p.add_argument("--init-backbone", help="backbone weights (.pdparams from "
                                           "`python -m weights_convert torchvision-resnet50`)")
    p.add_argument("--init", help="whole-model weights: Paddle .pdparams or an mmdet .pth checkpoint")
    p.add_argument("--eval-interval", type=_non_negative, default=1,
                   help="evaluate every N epochs (0: only when training ends; default 1)")
    p.add_argument("--ckpt-interval-iters", type=_non_negative, default=0,
                   help="also checkpoint every K iterations (0: only per epoch)")
    p.add_argument("--num-workers", type=_non_negative, default=2)
    p.add_argument("--seed", type=_non_negative, default=0)
    p.add_argument("--scale", type=parse_scale, help="resize scale WxH for training and evaluation "
                                               "(default 1333x800; smoke 320x192)")
    p.add_argument("--mmdet-log", help="mmdet json log (vis_data/scalars.json) to overlay in the report")
    p.add_argument("--reports", help="also copy train.html into this folder")
    p.add_argument("--report-only", action="store_true",
                   help="only (re)write the report from WORK_DIR's logs")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="with an error, also print its Python traceback (or set GHM_TRACEBACK=1)")
    return p.parse_args(argv)


def coco_paths(root: str | os.PathLike) -> dict[str, str]:
    """The four COCO inputs under ``root``; raises :class:`InputError` naming the first one missing."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--coco {root}: folder not found")
    paths = {
        "train_ann": root / "annotations" / "instances_train2017.json",
        "val_ann": root / "annotations" / "instances_val2017.json",
        "train_img": root / "train2017",
        "val_img": root / "val2017",
    }
    for key, path in paths.items():
        exists = path.is_file() if key.endswith("ann") else path.is_dir()
        if not exists:
            kind = "annotation file" if key.endswith("ann") else "image folder"
            raise InputError(f"--coco {root}: {kind} not found: {path}")
    return {k: str(v) for k, v in paths.items()}


# The mmdet log to overlay ------------------------------------------------------------------------

def read_mmdet_log(path: str | os.PathLike) -> dict[str, list[dict[str, float]]]:
    """Training and validation points of an mmdet json log.

    Reads mmengine's ``vis_data/scalars.json`` (and mmdet 2.x ``*.log.json``):
    a line with ``loss`` is a training point at global iteration ``step``
    (else ``iter``); a line with ``coco/bbox_mAP`` (or ``bbox_mAP``) is an
    evaluation at epoch ``epoch`` (else ``step``). Other lines are skipped.

    Returns ``{'train': [{'iter', 'loss', 'loss_cls', 'loss_bbox', 'lr'}...],
    'val': [{'epoch', 'bbox_mAP', 'bbox_mAP_50'}...]}`` (absent values omitted).
    Raises :class:`InputError` naming the file and line for a missing file,
    malformed JSON, or a file with no usable line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--mmdet-log {path}: file not found")
    train, val = [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"--mmdet-log {path}, line {number}: not JSON ({err})") from None
            if not isinstance(rec, dict):
                continue
            if "loss" in rec:
                x = rec.get("step", rec.get("iter"))
                if x is None:
                    raise InputError(f"--mmdet-log {path}, line {number}: a loss line without 'step' or 'iter'")
                point = {"iter": float(x)}
                point.update({k: float(rec[k]) for k in ("loss", "loss_cls", "loss_bbox", "lr") if k in rec})
                train.append(point)
            for prefix in ("coco/", ""):
                if f"{prefix}bbox_mAP" in rec:
                    epoch = rec.get("epoch", rec.get("step"))
                    if epoch is None:
                        raise InputError(f"--mmdet-log {path}, line {number}: an mAP line without 'epoch' or 'step'")
                    point = {"epoch": float(epoch)}
                    point.update({k: float(rec[f"{prefix}{k}"]) for k in ("bbox_mAP", "bbox_mAP_50")
                                  if f"{prefix}{k}" in rec})
                    val.append(point)
                    break
    if not train and not val:
        raise InputError(f"--mmdet-log {path}: no line with 'loss' or 'coco/bbox_mAP'")
    return {"train": train, "val": val}


# Model -------------------------------------------------------------------------------------------

class LossForward(nn.Layer):
    """The detector's training loss as ``forward``, so that ``paddle.DataParallel`` sees the call
    (it prepares its gradient all-reduce on the tensors ``forward`` returns)."""

    def __init__(self, detector: RetinaNet):
        super().__init__()
        self.detector = detector

    def forward(self, images, gt_bboxes, gt_labels, pad_shapes) -> dict[str, list[paddle.Tensor]]:
        """See :meth:`RetinaNet.loss`: ``{'loss_cls': [5 scalars], 'loss_bbox': [5 scalars]}``."""
        return self.detector.loss(images, gt_bboxes, gt_labels, pad_shapes)


def load_weights_file(path: str, flag: str, model: RetinaNet) -> dict[str, np.ndarray]:
    """A whole-model state dict from a Paddle ``.pdparams``, a training checkpoint ``.ckpt``
    (its rank-0 model) or an mmdet ``.pth`` checkpoint."""
    if not Path(path).is_file():
        raise InputError(f"{flag} {path}: file not found")
    if path.endswith(".ckpt"):
        try:
            return ckpt.load_checkpoint(path)["model"]
        except ValueError as err:
            raise InputError(f"{flag} {err}") from None
    if path.endswith((".pth", ".pt")):
        from torch_ref.reference import load_mmdet_state_dict
        from weights_convert.convert import ConversionError, convert_mmdet_state_dict
        try:
            return dict(convert_mmdet_state_dict(load_mmdet_state_dict(path), model, source_name=path))
        except (ConversionError, ValueError) as err:
            raise InputError(f"{flag} {err}") from None
    try:
        # Never paddle.load (pickle): a user's file must not run code.
        state = safe_load.load(path)
    except ValueError as err:
        raise InputError(f"{flag} {err}") from None
    if isinstance(state, dict) and state.get("format") == ckpt.FORMAT:
        return state["model"]
    if not isinstance(state, dict):
        raise InputError(f"{flag} {path}: expected a state dict, found {type(state).__name__}")
    return state


def load_weights(model: RetinaNet, state: dict[str, Any], source: str, prefix: str = "") -> None:
    """Set the parameters and buffers named ``prefix*`` from ``state``, strictly.

    Every model key under ``prefix`` must be present with the same shape,
    except the GHM buffers (a fresh model's zeros are kept when absent); a key
    the model does not have is an error. Raises :class:`InputError` naming
    ``source`` and the keys.
    """
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    optional = set(ckpt.GHM_BUFFER_KEYS) | {k.replace("acc_sum", "edges") for k in ckpt.GHM_BUFFER_KEYS}
    missing = sorted(k for k in own if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(f"{k}: {list(np.shape(state[k]))} vs {list(own[k].shape)}" for k in own
                   if k in state and list(np.shape(state[k])) != list(own[k].shape))
    if missing or unexpected or wrong:
        raise InputError(f"{source}: does not fit the model: missing {missing[:5]} ({len(missing)}), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)}), shape {wrong[:5]}")
    for key, tensor in own.items():
        if key in state:
            paddle.assign(paddle.to_tensor(np.asarray(state[key], dtype=tensor.numpy().dtype)), output=tensor)


def set_ghm_buffers(model: RetinaNet, buffers: dict[str, np.ndarray]) -> None:
    """Restore this process's GHM momentum buffers (``acc_sum`` of GHM-C and GHM-R)."""
    own = model.state_dict()
    for key in ckpt.GHM_BUFFER_KEYS:
        paddle.assign(paddle.to_tensor(np.asarray(buffers[key], dtype=np.float32)), output=own[key])


# Evaluation --------------------------------------------------------------------------------------

def evaluate(model: RetinaNet, loader, dataset: CocoDetection, out_json: Path | None = None
             ) -> tuple[dict[str, float], int]:
    """COCO box metrics of ``model`` on ``dataset`` (the whole set, on this process).

    Returns the 12 metrics named as mmdet's ``CocoMetric`` (empty when there is
    no detection at all) and the number of detections; the detections are
    written to ``out_json`` (COCO result format) when given. Leaves the model
    in eval mode; the caller switches back.
    """
    results, img_ids = [], []
    for batch in loader:
        metas = [{"img_shape": s, "scale_factor": f}
                 for s, f in zip(batch["img_shapes"], batch["scale_factors"])]
        results.extend(predict(model, batch["images"], metas))
        img_ids.extend(batch["img_ids"])
    records = detections_to_coco_json(results, img_ids, dataset.cat_ids, out_file=out_json)
    return evaluate_bbox(dataset.ann_file, records), len(records)


# Logs --------------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a json-lines file (none when it does not exist); a torn last line is skipped."""
    if not path.is_file():
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # only the line being written at a crash can be torn
    return out


def truncate_jsonl(path: Path, last_iter: int) -> None:
    """Keep only the records with ``iter <= last_iter``, rewriting ``path`` atomically.

    After a resume, lines an interrupted run wrote after its last checkpoint
    describe iterations that will run again.
    """
    if not path.is_file():
        return
    kept = [r for r in read_jsonl(path) if r.get("iter", 0) <= last_iter]
    write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        raise write_error(path, err) from err


def _format_eta(seconds: float) -> str:
    return str(_dt.timedelta(seconds=int(round(seconds))))


# Report ------------------------------------------------------------------------------------------

def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` values, as mmengine's logger smooths its loss lines."""
    window = max(1, min(window, len(values)))
    csum = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return (csum[idx] - csum[start]) / (idx - start)


def render_report(work_dir: Path, reports: str | None, mmdet_log: dict | None, run: dict[str, Any]) -> Path:
    """Write ``work_dir/train.html`` (self-contained: figures are inline PNGs) and copy it to ``reports``."""
    import jinja2
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = read_jsonl(work_dir / "log.jsonl")
    evals = read_jsonl(work_dir / "eval.jsonl")
    mm_train = (mmdet_log or {}).get("train", [])
    mm_val = (mmdet_log or {}).get("val", [])
    figures = []
    if logs:
        it = np.array([r["iter"] for r in logs], dtype=np.float64)
        # mmdet logs the mean over its logging interval (50 by default); smooth alike to compare.
        window = 50
        if len(mm_train) > 1:
            window = int(max(1, mm_train[1]["iter"] - mm_train[0]["iter"]))
        fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
        for ax, key in zip(axes, ("loss", "loss_cls", "loss_bbox")):
            y = np.array([r[key] for r in logs], dtype=np.float64)
            ax.plot(it, y, color="tab:blue", alpha=0.25, lw=0.8, label="Paddle (per iteration)")
            ax.plot(it, _moving_average(y, window), color="tab:blue", lw=1.5,
                    label=f"Paddle (mean of {window})")
            mm = [(p["iter"], p[key]) for p in mm_train if key in p]
            if mm:
                ax.plot(*zip(*mm), color="tab:red", lw=1.2, ls="--", label="mmdet log")
            ax.set_title(key)
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        figures.append(("Losses (sums over the five FPN levels; rank 0)", _png(fig)))
        plt.close(fig)

        fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
        axes[0].plot(it, [r["lr"] for r in logs], color="tab:blue", label="Paddle")
        mm = [(p["iter"], p["lr"]) for p in mm_train if "lr" in p]
        if mm:
            axes[0].plot(*zip(*mm), color="tab:red", ls="--", label="mmdet log")
        axes[0].set_title("learning rate")
        axes[0].legend(fontsize=8)
        axes[1].plot(it, [r["grad_norm"] for r in logs], color="tab:green", lw=0.8)
        axes[1].axhline(get_config()["optimizer"]["clip_grad_max_norm"], color="grey", ls=":",
                        label="clip max_norm")
        axes[1].set_title("gradient L2 norm before clipping")
        axes[1].legend(fontsize=8)
        for ax in axes:
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
        figures.append(("Learning rate and gradient norm", _png(fig)))
        plt.close(fig)

    ap_points = [(r["epoch"], r.get("bbox_mAP")) for r in evals if r.get("bbox_mAP") is not None]
    if ap_points or mm_val:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if ap_points:
            ax.plot(*zip(*ap_points), "o-", color="tab:blue", label="Paddle bbox_mAP")
        ap50 = [(r["epoch"], r["bbox_mAP_50"]) for r in evals if r.get("bbox_mAP_50") is not None]
        if ap50:
            ax.plot(*zip(*ap50), "s:", color="tab:blue", alpha=0.6, label="Paddle bbox_mAP_50")
        mm = [(p["epoch"], p["bbox_mAP"]) for p in mm_val if "bbox_mAP" in p]
        if mm:
            ax.plot(*zip(*mm), "o--", color="tab:red", label="mmdet bbox_mAP")
        ax.set_xlabel("epoch")
        ax.set_title("COCO box AP on the validation set")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        figures.append(("Box AP per epoch", _png(fig)))
        plt.close(fig)

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True)
    html = env.get_template("train.html.j2").render(
        run=run, figures=figures, evals=evals, metric_names=BBOX_METRIC_NAMES,
        last=logs[-1] if logs else None, n_iters=len(logs),
        mmdet_points=(len(mm_train), len(mm_val)),
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    out = write_text(work_dir / "train.html", html)
    if reports and Path(reports).resolve() != work_dir.resolve():
        write_text(Path(reports) / "train.html", html)
    return out


# Training ----------------------------------------------------------------------------------------

def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def _param_fingerprint(model: RetinaNet) -> paddle.Tensor:
    """``[sum, sum of squares]`` of every parameter in float64, shape ``(2,)``: equal on ranks
    whose weights are equal (used to check that data-parallel ranks stay in step)."""
    total = paddle.zeros([2], dtype="float64")
    with paddle.no_grad():
        for p in model.parameters():
            p64 = p.astype("float64")
            total += paddle.stack([p64.sum(), (p64 * p64).sum()])
    return total


def _non_finite_term(values: dict[str, Any]) -> str:
    """Which loss term is NaN or infinite, first by level: ``loss_cls (FPN level 2 of 5) is nan``."""
    for term in ("loss_cls", "loss_bbox"):
        for level, value in enumerate(values[f"{term}_levels"]):
            if not math.isfinite(value):
                return f"{term} of FPN level {level} (P{level + 3}) is {value}"
    return f"the total loss is {values['loss']}"


def _gather(obj: Any, world_size: int) -> list[Any]:
    """Every rank's ``obj`` (in rank order) on every rank."""
    if world_size == 1:
        return [obj]
    out: list[Any] = []
    dist.all_gather_object(out, obj)
    return out


class Trainer:
    """One training run: the data, model, optimizer and schedule of ``args`` on this process.

    Build it, then call :meth:`run`. Input problems raise :class:`InputError`
    before any output is written (except the generated tiny COCO).
    """

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.main = self.rank == 0
        self.work_dir = Path(args.work_dir)
        self.smoke = args.coco is None
        self.mmdet_log = read_mmdet_log(args.mmdet_log) if args.mmdet_log else None
        for flag in ("init_backbone", "init"):
            value = getattr(args, flag)
            if value and not Path(value).is_file():
                raise InputError(f"--{flag.replace('_', '-')} {value}: file not found")
        self.resume_from = self._resume_file()

        cfg = get_config()
        self.epochs = args.epochs or (SMOKE_EPOCHS if self.smoke else cfg["optimizer"]["max_epochs"])
        self.scale = args.scale or (SMOKE_SCALE if self.smoke else None)
        cfg["optimizer"]["max_epochs"] = self.epochs
        if args.warmup_iters:
            cfg["optimizer"]["warmup_iters"] = args.warmup_iters
        if args.milestones:
            cfg["optimizer"]["milestones"] = args.milestones
        self.cfg = cfg

        # The inputs and the output folders are checked before anything is written.
        real_coco = None if self.smoke else coco_paths(args.coco)
        self._check_output_dirs()
        self.paths = real_coco or self._tiny_coco_paths()
        self.train_set = CocoDetection(self.paths["train_ann"], self.paths["train_img"], train=True,
                                       seed=args.seed, scale=self.scale)
        self.val_set = CocoDetection(self.paths["val_ann"], self.paths["val_img"], train=False,
                                     scale=self.scale)
        # Every image the run will read exists (a missing one would otherwise
        # surface hours later, in some epoch or in the evaluation).
        check_image_files(self.train_set, self.val_set)
        self.loader = build_dataloader(self.train_set, batch_size=args.batch_size,
                                       num_workers=args.num_workers, seed=args.seed,
                                       rank=self.rank, world_size=self.world_size)
        self.val_loader = build_dataloader(self.val_set, num_workers=args.num_workers,
                                           rank=0, world_size=1)
        self.iters_per_epoch = len(self.loader)
        self.total_batch = args.batch_size * self.world_size
        self.base_lr = scaled_lr(self.total_batch, cfg) if args.lr == "auto" else float(args.lr)
        self.total_iters = self.iters_per_epoch * self.epochs
        if args.max_iters:
            self.total_iters = min(self.total_iters, args.max_iters)

        _seed_everything(args.seed)
        self.model = RetinaNet(cfg)
        if not self.resume_from:
            self._init_weights()
        self.model.train()
        self.loss_forward: nn.Layer = LossForward(self.model)
        if self.world_size > 1:
            # Broadcasts rank 0's parameters and buffers once; afterwards only
            # gradients are averaged, and GHM buffers evolve per process.
            self.loss_forward = paddle.DataParallel(self.loss_forward)
        self.optimizer = SGD(self.model, lr=self.base_lr, cfg=cfg)
        self.schedule = WarmupMultiStepLR.from_config(self.iters_per_epoch, self.total_batch,
                                                      cfg=cfg, base_lr=self.base_lr)
        self.iter = 0
        self.position = {"epoch": 0, "batch": 0}
        self._saved_at = -1
        if self.resume_from:
            self._restore(ckpt.load_checkpoint(self.resume_from))

    # Set-up ---------------------------------------------------------------------------------

    def _resume_file(self) -> Path | None:
        if self.args.resume is None:
            return None
        if self.args.resume != "auto":
            if not Path(self.args.resume).is_file():
                raise InputError(f"--resume {self.args.resume}: checkpoint not found")
            return Path(self.args.resume)
        latest = self.work_dir / "latest.ckpt"
        if latest.is_file():
            return latest
        if self.main:
            print(f"--resume: no checkpoint in {self.work_dir}, starting from scratch", file=sys.stderr)
        return None

    def _check_output_dirs(self) -> None:
        """Fail now, not after hours of training, when an output folder cannot be written."""
        if not self.main:
            return
        check_writable_dir(self.work_dir, "--work-dir")
        if self.args.reports:
            check_writable_dir(self.args.reports, "--reports")

    def _tiny_coco_paths(self) -> dict[str, str]:
        root = self.work_dir / "tiny_coco"
        if self.main and not (root / "annotations" / "instances_val2017.json").is_file():
            from paddle_impl.tiny_coco import generate
            generate(root, seed=self.args.seed, overwrite=True)
        if self.world_size > 1:
            dist.barrier()  # the others read what rank 0 generated
        return coco_paths(root)

    def _init_weights(self) -> None:
        if self.args.init_backbone:
            state = load_weights_file(self.args.init_backbone, "--init-backbone", self.model)
            load_weights(self.model, state, f"--init-backbone {self.args.init_backbone}", prefix="backbone.")
        if self.args.init:
            state = load_weights_file(self.args.init, "--init", self.model)
            load_weights(self.model, state, f"--init {self.args.init}")

    def _restore(self, state: dict[str, Any]) -> None:
        """Load a checkpoint: this rank's GHM and RNG state, the shared rest."""
        source = f"--resume {self.resume_from}"
        if state["world_size"] != self.world_size:
            raise InputError(f"{source}: saved by {state['world_size']} processes, this run has "
                             f"{self.world_size}: the per-process GHM state and sampler shares differ")
        load_weights(self.model, state["model"], source)
        set_ghm_buffers(self.model, state["ghm_per_rank"][self.rank])
        try:
            self.optimizer.set_state_dict(state["optimizer"])
            self.schedule.set_state_dict(state["lr_schedule"])
        except (KeyError, ValueError) as err:
            raise InputError(f"{source}: {err}") from None
        ckpt.set_rng_state(state["rng"][self.rank])
        self.iter = int(state["iter"])
        self.position = dict(state["sampler"])
        self._saved_at = self.iter

    # Checkpoints ----------------------------------------------------------------------------

    def _state(self) -> dict[str, Any] | None:
        """The full checkpoint on rank 0 (None elsewhere); every rank must call it."""
        ghm = _gather(ckpt.ghm_buffers(self.model.state_dict()), self.world_size)
        rngs = _gather(ckpt.rng_state(), self.world_size)
        if not self.main:
            return None
        return {
            "format": ckpt.FORMAT,
            "iter": self.iter,
            "epoch": self.position["epoch"],
            "world_size": self.world_size,
            "model": ckpt.to_numpy_tree(self.model.state_dict()),
            "ghm_per_rank": ghm,
            "optimizer": ckpt.to_numpy_tree(self.optimizer.state_dict()),
            "lr_schedule": self.schedule.state_dict(),
            "sampler": dict(self.position),
            "rng": rngs,
            "run": self.run_info(),
        }

    def save_checkpoint(self) -> None:
        """Write ``latest.ckpt`` for the current iteration (once per iteration)."""
        if self._saved_at == self.iter:
            return
        state = self._state()
        if self.main:
            ckpt.atomic_save(state, self.work_dir / "latest.ckpt")
        self._saved_at = self.iter

    def save_weights(self, name: str) -> None:
        """Model weights only (``--init`` or ``predict --weights``)."""
        if self.main:
            ckpt.atomic_save(self.model.state_dict(), self.work_dir / name,
                             save_fn=lambda obj, path: paddle.save(obj, path))

    # The loop -------------------------------------------------------------------------------

    def run_info(self) -> dict[str, Any]:
        a = self.args
        return {
            "mode": "SMOKE (tiny synthetic COCO)" if self.smoke else "COCO",
            "coco": a.coco or str(self.work_dir / "tiny_coco"),
            "epochs": self.epochs, "iters_per_epoch": self.iters_per_epoch, "total_iters": self.total_iters,
            "max_iters": a.max_iters, "world_size": self.world_size, "batch_per_process": a.batch_size,
            "total_batch": self.total_batch, "base_lr": self.base_lr,
            "lr_rule": "0.01 x total_batch / 16" if a.lr == "auto" else "given",
            "warmup_iters": self.cfg["optimizer"]["warmup_iters"],
            "milestones": self.cfg["optimizer"]["milestones"],
            "scale": list(self.scale) if self.scale else list(self.cfg["data"]["scale"]),
            "train_images": len(self.train_set), "val_images": len(self.val_set),
            "seed": a.seed, "init_backbone": a.init_backbone, "init": a.init,
            "resumed_from": str(self.resume_from) if self.resume_from else None,
        }

    def _evaluate(self, epoch: int) -> None:
        """Rank 0 evaluates on the whole validation set; the others wait."""
        if self.main:
            metrics, count = evaluate(self.model, self.val_loader, self.val_set,
                                      self.work_dir / "val_results.bbox.json")
            record = {"epoch": epoch, "iter": self.iter, "num_detections": count}
            record.update({k: metrics.get(k) for k in BBOX_METRIC_NAMES})
            _append_jsonl(self.work_dir / "eval.jsonl", record)
            print(f"[eval] epoch {epoch} iter {self.iter}: bbox_mAP {record['bbox_mAP']} "
                  f"mAP_50 {record['bbox_mAP_50']} ({count} detections)", file=sys.stderr)
        self.model.train()
        if self.world_size > 1:
            dist.barrier()

    def _step(self, batch: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """One optimizer update on ``batch``; returns the loss values and the gradient norm."""
        lr = self.schedule.get_lr()
        self.optimizer.set_lr(lr)
        losses = self.loss_forward(batch["images"], batch["gt_bboxes"], batch["gt_labels"],
                                   batch["pad_shapes"])
        # mmdet's parse_losses order: sum the levels of each loss, then the two sums.
        loss_cls = sum(losses["loss_cls"])
        loss_bbox = sum(losses["loss_bbox"])
        total = loss_cls + loss_bbox
        values = {
            "lr": lr,
            "loss_cls": float(loss_cls), "loss_bbox": float(loss_bbox), "loss": float(total),
            "loss_cls_levels": [float(v) for v in losses["loss_cls"]],
            "loss_bbox_levels": [float(v) for v in losses["loss_bbox"]],
        }
        iteration = self.iter + 1
        if not math.isfinite(values["loss"]):
            raise NonFiniteLossError(f"iteration {iteration}: {_non_finite_term(values)}; stopped "
                                     "before the update, the last checkpoint is unchanged")
        total.backward()
        grad_norm = float(self.optimizer.clip_and_step())
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(f"iteration {iteration}: the gradient norm is {grad_norm} "
                                     f"(loss {values['loss']:.6g}); stopped, the last checkpoint is unchanged")
        self.optimizer.clear_grad()
        self.schedule.step()
        return values, grad_norm

    def run(self) -> None:
        """Train to ``total_iters``. A data fault stops the run after saving the state of the
        last complete iteration (one process; several save at their intervals), so that
        ``--resume`` continues from it; a non-finite loss stops it without saving."""
        args, wd = self.args, self.work_dir
        if self.main:
            stale = remove_stale_temp_files(wd)
            if stale:
                print(f"[train] removed {len(stale)} temporary file(s) of an interrupted write in {wd}",
                      file=sys.stderr)
            if self.resume_from:
                truncate_jsonl(wd / "log.jsonl", self.iter)
                truncate_jsonl(wd / "eval.jsonl", self.iter)
            else:
                for name in ("log.jsonl", "eval.jsonl"):
                    (wd / name).unlink(missing_ok=True)
            write_json(wd / "run.json", self.run_info(), indent=1)
            print(f"[train] {self.run_info()['mode']}: {self.epochs} epochs x {self.iters_per_epoch} "
                  f"iterations, {self.world_size} process(es) x {args.batch_size} images, "
                  f"lr {self.base_lr:g}, stopping at iteration {self.total_iters}", file=sys.stderr)
        bar = None
        if self.main and not args.no_progress:
            from tqdm import tqdm
            bar = tqdm(total=self.total_iters, initial=self.iter, desc="train", dynamic_ncols=True)
        try:
            self._train(bar)
        except DataError:
            if self.world_size == 1 and 0 < self.iter != self._saved_at:
                self.save_checkpoint()
                print(f"[train] saved iteration {self.iter} to {wd / 'latest.ckpt'}; "
                      "fix the data and continue with --resume", file=sys.stderr)
            raise
        finally:
            if bar is not None:
                bar.close()
        if self.main:
            report = render_report(wd, args.reports, self.mmdet_log, self.run_info())
            print(f"[train] done: {self.iter} iterations; report {report}", file=sys.stderr)

    def _train(self, bar) -> None:
        args, wd = self.args, self.work_dir
        started, done_here = time.perf_counter(), 0
        evaluated_at = -1
        while self.iter < self.total_iters:
            epoch = self.position["epoch"]
            if self.position["batch"] > 0:
                self.loader.batch_sampler.load_state_dict(self.position)
            else:
                self.loader.batch_sampler.set_epoch(epoch)
            t_data = time.perf_counter()
            for batch in self.loader:
                t_start = time.perf_counter()
                values, grad_norm = self._step(batch)
                self.iter += 1
                done_here += 1
                pos = resume_position(batch["keys"])
                self.position = ({"epoch": epoch + 1, "batch": 0} if pos["batch"] >= self.iters_per_epoch
                                 else pos)
                spread = None
                if self.world_size > 1:
                    prints = _gather(self._fingerprint(), self.world_size)
                    spread = float(np.max(np.abs(np.array(prints) - np.array(prints[0]))))
                now = time.perf_counter()
                per_iter = (now - started) / done_here
                eta = per_iter * (self.total_iters - self.iter)
                if self.main:
                    record = {"iter": self.iter, "epoch": epoch + 1, "iter_in_epoch": pos["batch"],
                              **values, "grad_norm": grad_norm, "time": now - t_data,
                              "data_time": t_start - t_data, "eta_s": eta, "eta": _format_eta(eta)}
                    if spread is not None:
                        record["param_rank_spread"] = spread
                    _append_jsonl(wd / "log.jsonl", record)
                    if bar is not None:
                        bar.set_postfix(epoch=epoch + 1, loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
                        bar.update(1)
                if args.ckpt_interval_iters and self.iter % args.ckpt_interval_iters == 0:
                    self.save_checkpoint()
                if self.iter >= self.total_iters:
                    break
                t_data = time.perf_counter()
            if self.position["epoch"] == epoch + 1:
                # A whole epoch is done: its state goes to disk before the
                # evaluation, which may fail (a bad val image) or take hours.
                self.save_checkpoint()
                self.save_weights(f"epoch_{epoch + 1}.pdparams")
                if args.eval_interval and (epoch + 1) % args.eval_interval == 0:
                    self._evaluate(epoch + 1)
                    evaluated_at = self.iter
        self.save_checkpoint()
        self.save_weights("model_final.pdparams")
        if evaluated_at != self.iter:
            self._evaluate(self.position["epoch"] + (1 if self.position["batch"] else 0))

    def _fingerprint(self) -> list[float]:
        return _param_fingerprint(self.model).numpy().tolist()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> int:
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
        Trainer(args).run()
        return 0

    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
