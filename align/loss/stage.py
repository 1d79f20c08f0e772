"""Loss alignment of the GHM RetinaNet.

mmdet's model (with the checkpoint) turns seeded images into per-level head
outputs; those same arrays and the same ground truth then go through mmdet's
``loss_by_feat`` and through ours, for several iterations in a row so the GHM
momentum buffers evolve. Compared, in computation order: the assigned labels,
label weights, box targets and weights per level, positives per image; for
every GHM call (one per level and iteration) its bin counts and momentum
buffer afterwards; every loss term per level, their sums and the total.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np

from align.engine.cli import progress
from align.engine.compare import TensorDiff, diff_arrays, first_failed_name
from align.engine.reprod import reprod_log_diff
from align.engine.report import Headline, StageResult
from align.ghm.fake_batch import FakeBatch, default_batch
from align.engine.options import option
from align.ghm.pair import (LEVELS, GhmStageOptions, build_paddle_model, build_torch_model, parse_shape,
                            prepare_checkpoints, seeded_images)
from common.arguments import non_negative_float, positive, tensor_shape
from align.ghm.recorders import PaddleGHMRecorder, TorchGHMRecorder, ghm_records
from align.ghm.sides import level_terms
from align.ghm.suite import write_report

DEFAULT_SHAPE = "2x3x800x1344"


@dataclass
class LossOptions(GhmStageOptions):
    shape: str = option(DEFAULT_SHAPE, "batch 2x3xHxW (default %(default)s)", type=tensor_shape(4, channels=3))
    iters: int = option(4, "loss calls in a row, 5 GHM calls each (default %(default)s)", type=positive)
    rel_tol: float = option(1e-6, "bound on max|diff| / max|ref| (default %(default)s)", type=non_negative_float)
    mean_tol: float = option(1e-6, "bound on mean|diff| (default %(default)s)", type=non_negative_float)
    # mmdet sums the weighted GHM-C loss of a level in float32: over the
    # 24M elements of P3 at 800x1344 that sum is off the exact (float64)
    # value by ~1.1e-6 relative, while ours (a float64 sum) is within ~2e-8.
    loss_rel_tol: float = option(5e-6, "relative bound on loss terms, mmdet's float32 sums are off ~1e-6 "
                                       "(default %(default)s)", type=non_negative_float)


def mmdet_inputs(batch: FakeBatch):
    """mmdet's ``batch_gt_instances`` and ``batch_img_metas`` for the batch."""
    import torch
    from mmengine.structures import InstanceData

    gts = [InstanceData(bboxes=torch.from_numpy(b), labels=torch.from_numpy(l))
           for b, l in zip(batch.gt_bboxes, batch.gt_labels)]
    metas = [dict(img_shape=s, pad_shape=p, batch_input_shape=batch.batch_shape,
                  scale_factor=(1.0, 1.0)) for s, p in zip(batch.img_shapes, batch.pad_shapes)]
    return gts, metas


def torch_targets(head, cls_scores, gts, metas, num_classes) -> dict[str, np.ndarray]:
    featmap_sizes = [s.shape[-2:] for s in cls_scores]
    anchors, valid = head.get_anchors(featmap_sizes, metas, device="cpu")
    labels, label_w, box_t, box_w, _ = head.get_targets(anchors, valid, gts, metas)
    out = {}
    for name, l, lw, bt, bw in zip(LEVELS, labels, label_w, box_t, box_w):
        out[f"targets.{name}.labels"] = l.numpy()
        out[f"targets.{name}.label_weights"] = lw.numpy()
        out[f"targets.{name}.bbox_targets"] = bt.numpy()
        out[f"targets.{name}.bbox_weights"] = bw.numpy()
    all_labels = np.concatenate([l.numpy() for l in labels], axis=1)
    all_w = np.concatenate([w.numpy() for w in label_w], axis=1)
    out["targets.num_pos"] = ((all_labels != num_classes) & (all_w > 0)).sum(axis=1).astype(np.int64)
    return out


def paddle_targets(targets) -> dict[str, np.ndarray]:
    out = {}
    for name, t in zip(LEVELS, targets.levels):
        out[f"targets.{name}.labels"] = t.labels.numpy()
        out[f"targets.{name}.label_weights"] = t.label_weights.numpy()
        out[f"targets.{name}.bbox_targets"] = t.bbox_targets.numpy()
        out[f"targets.{name}.bbox_weights"] = t.bbox_weights.numpy()
    out["targets.num_pos"] = targets.num_pos.numpy().astype(np.int64)
    return out


def iteration_terms(losses: dict, it: int) -> dict[str, np.float64]:
    """`level_terms` of one iteration's losses, named ``iter{it}.<term>``."""
    return {f"iter{it}.{name}": value for name, value in level_terms(losses).items()}


def density_histograms(recorders: dict[str, tuple]) -> list[tuple[str, bytes]]:
    """One figure per FPN level: the bin counts of the level's GHM calls in the first iteration.

    ``recorders`` maps a loss name ("GHM-C", "GHM-R") to its ``(mmdet, paddle)``
    recorders, one panel each, top to bottom. The counts are the gradient
    density each element's weight is divided by: mmdet's filled, ours as a
    line, a bin whose counts differ shaded red. Every iteration sees the same
    head outputs, so its counts are those of the first.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figures = []
    # Both heads call each GHM loss once per level, P3 to P7: call k of the first iteration is level k.
    for call, level in enumerate(LEVELS):
        figure = Figure(figsize=(2.5, 3.5), dpi=90)
        FigureCanvasAgg(figure)
        panels = figure.subplots(len(recorders), 1)
        for axes, (loss, (reference, ours)) in zip(panels, recorders.items()):
            # g lies in [0, 1]; GHM-C's last edge is 1 + 1e-6 and GHM-R's 1e3.
            edges = np.minimum(reference.edges().astype(np.float64), 1.0)
            ref, got = reference.counts[call], ours.counts[call]
            top = max(int(ref.max()), int(got.max()), 1) * 3
            differ = np.flatnonzero(ref != got)
            axes.set_yscale("log")
            axes.set_ylim(0.5, top)
            axes.set_xlim(0, 1)
            axes.bar(edges[:-1], ref, width=np.diff(edges), align="edge", color="#b8c7d9", label="mmdet")
            axes.stairs(got, edges, color="#1f6fb2", linewidth=1.0, label="Paddle")
            if differ.size:
                axes.bar(edges[differ], top, width=np.diff(edges)[differ], align="edge", color="#c0392b",
                         alpha=0.25, label="differs")
            if not (ref.any() or got.any()):
                axes.text(0.5, 0.5, "no element binned", transform=axes.transAxes, ha="center", va="center",
                          fontsize=7, color="#57606a")
                axes.tick_params(axis="y", which="both", left=False, labelleft=False)
            verdict = f"{differ.size} bins differ" if differ.size > 1 else "1 bin differs" if differ.size else "equal"
            axes.set_title(f"{loss} {level}: {verdict}", fontsize=8, color="#c0392b" if differ.size else "black")
            axes.tick_params(labelsize=7)
            axes.set_ylabel("elements", fontsize=7)
        panels[0].legend(fontsize=6, loc="upper center", framealpha=0.8, edgecolor="none")
        panels[-1].set_xlabel("g", fontsize=7)
        figure.tight_layout(pad=0.4)
        buffer = io.BytesIO()
        # No "Software" chunk: it would carry matplotlib's URL into the page.
        figure.savefig(buffer, format="png", metadata={"Software": None})
        figures.append((f"{level}, iteration 1: GHM gradient density, {' (top), '.join(recorders)} (bottom)",
                        buffer.getvalue()))
    return figures


def run_loss(opts: LossOptions) -> StageResult:
    """Run both losses, diff, write ``loss*`` files into ``opts.reports``."""
    import paddle
    import torch

    shape = parse_shape(opts.shape)
    if shape[0] != 2:
        raise ValueError(f"--shape {opts.shape}: the loss stage's fake batch has 2 images, not {shape[0]}")
    batch = default_batch(shape[2:])
    ckpts = prepare_checkpoints(opts.ckpt, opts.seed, opts.build_dir)
    torch_model = build_torch_model(ckpts)
    paddle_model = build_paddle_model(ckpts)
    t_head, p_head = torch_model.bbox_head, paddle_model.bbox_head
    num_classes = p_head.num_classes

    images = seeded_images(shape, opts.seed)
    with torch.no_grad():
        t_cls, t_box = t_head(torch_model.extract_feat(torch.from_numpy(images)))
    cls_np = [c.numpy().copy() for c in t_cls]
    box_np = [b.numpy().copy() for b in t_box]
    gts, metas = mmdet_inputs(batch)

    torch_out = torch_targets(t_head, t_cls, gts, metas, num_classes)
    p_targets = paddle_model.target_builder([c.shape[-2:] for c in cls_np], batch.gt_bboxes,
                                            batch.gt_labels, batch.pad_shapes)
    paddle_out = paddle_targets(p_targets)

    t_rec_c, t_rec_b = TorchGHMRecorder(t_head.loss_cls, "cls"), TorchGHMRecorder(t_head.loss_bbox, "bbox")
    p_rec_c, p_rec_b = PaddleGHMRecorder(p_head.loss_cls), PaddleGHMRecorder(p_head.loss_bbox)
    seconds = {"mmdet_loss_s": 0.0, "paddle_loss_s": 0.0}
    t_loss_terms, p_loss_terms = {}, {}
    for it in progress(range(opts.iters), "loss"):
        t0 = time.perf_counter()
        with torch.no_grad(), t_rec_c, t_rec_b:
            t_losses = t_head.loss_by_feat([torch.from_numpy(c) for c in cls_np],
                                           [torch.from_numpy(b) for b in box_np], gts, metas)
        seconds["mmdet_loss_s"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        with paddle.no_grad(), p_rec_c, p_rec_b:
            targets = paddle_model.target_builder([c.shape[-2:] for c in cls_np], batch.gt_bboxes,
                                                  batch.gt_labels, batch.pad_shapes)
            p_losses = p_head.loss([paddle.to_tensor(c) for c in cls_np],
                                   [paddle.to_tensor(b) for b in box_np], targets)
            p_terms = iteration_terms(p_losses, it)
        seconds["paddle_loss_s"] += time.perf_counter() - t0
        t_loss_terms.update(iteration_terms(t_losses, it))
        p_loss_terms.update(p_terms)

    torch_out.update(ghm_records("ghmc", t_rec_c))
    torch_out.update(ghm_records("ghmr", t_rec_b))
    torch_out.update(t_loss_terms)
    paddle_out.update(ghm_records("ghmc", p_rec_c))
    paddle_out.update(ghm_records("ghmr", p_rec_b))
    paddle_out.update(p_loss_terms)

    tensors: list[TensorDiff] = []
    for name in torch_out:
        exact = name.endswith(("bin_counts", "labels", "num_pos"))
        # Loss terms are scalars of size ~1-10: their bound is relative only.
        scalar = name.startswith("iter")
        tensors.append(diff_arrays(name, torch_out[name], paddle_out.get(name, np.array([np.nan])),
                                   rel_tol=0.0 if exact else (opts.loss_rel_tol if scalar else opts.rel_tol),
                                   mean_tol=0.0 if exact else (np.inf if scalar else opts.mean_tol)))
    reprod = reprod_log_diff(paddle_out, torch_out, opts.reports, "loss", opts.mean_tol)
    passed = all(t.passed for t in tensors)

    # The recorders' own counting is not part of mmdet's loss.
    seconds["mmdet_loss_s"] -= t_rec_c.overhead + t_rec_b.overhead
    ghm_seconds = {"mmdet_ghm_s": t_rec_c.seconds + t_rec_b.seconds}
    meta = {
        "seed": opts.seed,
        "input_shape": list(shape),
        "iterations": opts.iters,
        "ghm_calls_per_module": opts.iters * len(LEVELS),
        "img_shapes": [list(s) for s in batch.img_shapes],
        "pad_shapes": [list(s) for s in batch.pad_shapes],
        "gt_boxes_per_image": [int(len(b)) for b in batch.gt_bboxes],
        "positives_per_image": paddle_out["targets.num_pos"].tolist(),
        "checkpoint": str(ckpts.torch_path),
        "checkpoint_sha256": ckpts.sha256,
        "checkpoint_synthetic": ckpts.synthetic,
        **{k: round(v, 3) for k, v in {**seconds, **ghm_seconds}.items()},
    }
    return write_report(StageResult(
        stage="loss",
        title="Loss: anchors, targets and GHM losses, mmdet vs Paddle",
        passed=passed,
        tensors=tensors,
        layers=[],
        thresholds={"rel_max": opts.rel_tol, "mean_abs": opts.mean_tol,
                    "loss terms (rel)": opts.loss_rel_tol,
                    "labels, bin counts, positives": "exact"},
        meta=meta,
        figures=density_histograms({"GHM-C": (t_rec_c, p_rec_c), "GHM-R": (t_rec_b, p_rec_b)}),
        reprod_log=reprod,
        reprod_log_check=opts.mean_tol,
        reprod_log_why=(f"a loss term is checked relative to its size (rel {opts.loss_rel_tol:.0e}), because mmdet "
                        "sums the millions of float32 elements of a level in float32, about 1e-6 relative off "
                        "the exact sum, so terms of order 1 differ by more than the absolute mean bound"),
        headline=Headline.worst(tensors, None, "worst max|diff| / max|ref| (bound per row: see thresholds)"),
        seconds={"mmdet": seconds["mmdet_loss_s"], "paddle": seconds["paddle_loss_s"]},
    ), opts.reports)


def first_divergence(result: StageResult) -> str | None:
    return first_failed_name(result.tensors)
