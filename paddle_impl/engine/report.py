"""The training run's record: json-lines logs, an mmdet log to compare with, and ``train.html``.

``log.jsonl`` and ``eval.jsonl`` hold one JSON object per line (see
:mod:`paddle_impl.train` for the fields); :func:`render_report` draws them,
overlaid with an mmdet json log when one is given, into a self-contained page.
"""
from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from paddle_impl.config import get_config
from common.atomic_write import write_text
from common.atomic_write import write_error
from common.errors import InputError
from paddle_impl.evaluation.coco_eval import BBOX_METRIC_NAMES

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


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


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        raise write_error(path, err) from err


class ThroughputLog:
    """The training log line every ``interval`` iterations, with the throughput figures
    Paddle's model-reproduction logs give (TIPC's ``avg_reader_cost``, ``avg_batch_cost``,
    ``avg_samples``, ``avg_ips``), averaged over the iterations since the previous line.

    ``add(record, samples)`` takes one iteration's ``log.jsonl`` record (its ``data_time``
    is the wait for the batch, ``time`` the whole iteration) and the images it trained on,
    and returns the line when one is due (``flush`` returns the rest at the end).
    """

    def __init__(self, interval: int, total_iters: int):
        self.interval = max(1, int(interval))
        self.total_iters = total_iters
        self._reader = self._batch = 0.0
        self._samples = self._count = 0
        self._last: dict | None = None

    def add(self, record: dict, samples: int) -> str | None:
        self._reader += record["data_time"]
        self._batch += record["time"]
        self._samples += samples
        self._count += 1
        self._last = record
        due = record["iter"] % self.interval == 0 or record["iter"] >= self.total_iters
        return self.flush() if due else None

    def flush(self) -> str | None:
        if not self._count:
            return None
        r, n = self._last, self._count
        line = (f"[train] epoch {r['epoch']} iter {r['iter']}/{self.total_iters}: loss {r['loss']:.4f}, "
                f"lr {r['lr']:.6g}, avg_reader_cost: {self._reader / n:.5f} s, avg_batch_cost: "
                f"{self._batch / n:.5f} s, avg_samples: {self._samples / n:g}, avg_ips: "
                f"{self._samples / self._batch if self._batch > 0 else float('nan'):.5f} samples/s, eta {r['eta']}")
        self._reader = self._batch = 0.0
        self._samples = self._count = 0
        return line


def format_eta(seconds: float) -> str:
    return str(_dt.timedelta(seconds=int(round(seconds))))


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
