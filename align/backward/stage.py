"""Backward and training-step alignment of the GHM RetinaNet.

From the same converted weights, mmdet's model (with mmengine's optimizer
wrapper and schedulers built from mmdet's config) and ours (``SGD``,
``clip_grad_norm_``, ``WarmupMultiStepLR``) train the same number of steps on
the same seeded batches. Compared at every step: each loss term, the total
loss, the gradient norm before clipping and the learning rate; at step 1 the
gradient of every parameter; after the last step every parameter and every
momentum buffer.

The warm-up is shortened to half the steps (by default 5 of 10) and the base
learning rate raised, so the weights really move and the schedule is
exercised within a short run.
"""
from __future__ import annotations

import copy
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from align.compare import TensorDiff, diff_arrays, first_failure, missing_row, reprod_log_diff
from align.ghm_pair import (BUILD_DIR, build_paddle_model, build_torch_model, parse_shape,
                            prepare_checkpoints, seeded_images)
from align.loss.fake_batch import FakeBatch, random_batch
from align.loss.stage import loss_terms
from align.report import StageResult, environment_info, write_stage_report

DEFAULT_SHAPE = "2x3x320x480"


@dataclass
class BackwardOptions:
    ckpt: str | None = None
    shape: str = DEFAULT_SHAPE
    seed: int = 0
    steps: int = 10
    lr: float = 0.02
    warmup_iters: int | None = None  # default: steps // 2
    grad_tol: float = 1e-5
    loss_tol_first: float = 1e-5
    loss_tol: float = 1e-4
    param_tol: float = 1e-4
    reports: Path = Path("reports")
    build_dir: Path = BUILD_DIR


def make_batches(opts: BackwardOptions) -> list[tuple[np.ndarray, FakeBatch]]:
    shape = parse_shape(opts.shape)
    return [(seeded_images(shape, opts.seed + 1000 * (k + 1)),
             random_batch(shape[2:], opts.seed + k, num_images=shape[0], empty_image=(k % 4 == 3)))
            for k in range(opts.steps)]


class TorchTrainer:
    """mmdet's model trained with mmengine's own optimizer wrapper and schedulers."""

    def __init__(self, model, opts: BackwardOptions, warmup: int):
        from mmengine.optim import build_optim_wrapper
        from mmengine.registry import PARAM_SCHEDULERS

        from torch_ref.reference import load_config

        cfg = load_config()
        optim_cfg = copy.deepcopy(cfg.optim_wrapper)
        optim_cfg.optimizer.lr = opts.lr
        self.model = model
        self.model.train()
        self.wrapper = build_optim_wrapper(model, optim_cfg)
        self.schedulers = []
        for sched_cfg in cfg.param_scheduler:
            sched_cfg = copy.deepcopy(sched_cfg)
            if not sched_cfg.get("by_epoch", True):
                sched_cfg["end"] = warmup
            else:
                sched_cfg.setdefault("end", cfg.train_cfg.max_epochs)
            self.schedulers.append(PARAM_SCHEDULERS.build(
                sched_cfg, default_args=dict(optimizer=self.wrapper, epoch_length=opts.steps)))

    def step(self, images: np.ndarray, batch: FakeBatch, keep_grads: bool):
        import torch
        from mmengine.logging import MessageHub
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData

        samples = []
        for b, l, s, p in zip(batch.gt_bboxes, batch.gt_labels, batch.img_shapes, batch.pad_shapes):
            ds = DetDataSample(metainfo=dict(img_shape=s, pad_shape=p, batch_input_shape=batch.batch_shape,
                                             scale_factor=(1.0, 1.0)))
            ds.gt_instances = InstanceData(bboxes=torch.from_numpy(b), labels=torch.from_numpy(l))
            samples.append(ds)
        lr = self.wrapper.optimizer.param_groups[0]["lr"]
        losses = self.model.loss(torch.from_numpy(images), samples)
        total = sum(losses["loss_cls"]) + sum(losses["loss_bbox"])
        self.wrapper.backward(total)
        grads = ({n: p.grad.numpy().copy() for n, p in self.model.named_parameters() if p.grad is not None}
                 if keep_grads else {})
        self.wrapper.step()
        self.wrapper.zero_grad()
        grad_norm = MessageHub.get_current_instance().get_scalar("train/grad_norm").current()
        for s in self.schedulers:
            if not s.by_epoch:
                s.step()
        return losses, float(grad_norm), lr, grads

    def parameters(self) -> dict[str, np.ndarray]:
        return {n: p.detach().numpy().copy() for n, p in self.model.named_parameters()}

    def momentum_buffers(self) -> dict[str, np.ndarray]:
        state = self.wrapper.optimizer.state
        return {n: state[p]["momentum_buffer"].numpy().copy()
                for n, p in self.model.named_parameters() if p in state and "momentum_buffer" in state[p]}


class PaddleTrainer:
    """Our model with ``SGD``, ``clip_grad_norm_`` and ``WarmupMultiStepLR``."""

    def __init__(self, model, opts: BackwardOptions, warmup: int):
        from paddle_impl.config import get_config
        from paddle_impl.lr_schedule import WarmupMultiStepLR
        from paddle_impl.optimizer import SGD

        o = get_config()["optimizer"]
        self.model = model
        self.model.train()
        self.optimizer = SGD(model, lr=opts.lr)
        self.schedule = WarmupMultiStepLR(
            base_lr=opts.lr, iters_per_epoch=opts.steps, warmup_start_factor=o["warmup_start_factor"],
            warmup_iters=warmup, milestones=o["milestones"], gamma=o["gamma"], max_epochs=o["max_epochs"])
        self.max_norm = o["clip_grad_max_norm"]

    def step(self, images: np.ndarray, batch: FakeBatch, keep_grads: bool):
        import paddle

        lr = self.schedule.lr_at(self.schedule.iteration)
        self.optimizer.set_lr(lr)
        losses = self.model.loss(paddle.to_tensor(images), batch.gt_bboxes, batch.gt_labels,
                                 batch.pad_shapes)
        total = paddle.add_n(losses["loss_cls"] + losses["loss_bbox"])
        total.backward()
        grads = ({n: p.grad.numpy().copy() for n, p in self.model.named_parameters()
                  if p.grad is not None and not p.stop_gradient} if keep_grads else {})
        grad_norm = self.optimizer.clip_and_step(self.max_norm)
        self.optimizer.clear_grad()
        self.schedule.step()
        return losses, float(grad_norm), lr, grads

    def parameters(self) -> dict[str, np.ndarray]:
        return {n: p.numpy().copy() for n, p in self.model.named_parameters()}

    def momentum_buffers(self) -> dict[str, np.ndarray]:
        return {n: b.numpy().copy() for n, b in self.optimizer.momentum_buffers().items()}


def loss_curve_png(torch_totals: list[float], paddle_totals: list[float]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(torch_totals) + 1)
    t, p = np.asarray(torch_totals), np.asarray(paddle_totals)
    rel = np.abs(p - t) / np.maximum(np.abs(t), 1e-30)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(steps, t, "o-", label="mmdet")
    a.plot(steps, p, "x--", label="paddle")
    a.set_xlabel("step")
    a.set_ylabel("total loss")
    a.legend()
    b.semilogy(steps, np.maximum(rel, 1e-12), "o-")
    b.set_xlabel("step")
    b.set_ylabel("|paddle - mmdet| / |mmdet|")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def run_backward(opts: BackwardOptions) -> StageResult:
    """Train both for ``opts.steps`` steps, diff, write ``backward*`` files."""
    warmup = opts.warmup_iters if opts.warmup_iters is not None else max(1, opts.steps // 2)
    ckpts = prepare_checkpoints(opts.ckpt, opts.seed, opts.build_dir)
    batches = make_batches(opts)
    torch_side = TorchTrainer(build_torch_model(ckpts), opts, warmup)
    paddle_side = PaddleTrainer(build_paddle_model(ckpts), opts, warmup)

    torch_out: dict[str, np.ndarray] = {}
    paddle_out: dict[str, np.ndarray] = {}
    tols: dict[str, float] = {}
    seconds = {"mmdet_s": 0.0, "paddle_s": 0.0}
    totals = {"mmdet": [], "paddle": []}
    for k, (images, batch) in enumerate(batches):
        first = k == 0
        t0 = time.perf_counter()
        t_losses, t_norm, t_lr, t_grads = torch_side.step(images, batch, keep_grads=first)
        seconds["mmdet_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        p_losses, p_norm, p_lr, p_grads = paddle_side.step(images, batch, keep_grads=first)
        seconds["paddle_s"] += time.perf_counter() - t0

        t_terms = loss_terms(t_losses, k + 1, float)
        p_terms = loss_terms(p_losses, k + 1, float)
        for side, terms, norm, lr in (("t", t_terms, t_norm, t_lr), ("p", p_terms, p_norm, p_lr)):
            out = torch_out if side == "t" else paddle_out
            for name, v in terms.items():
                out[name.replace("iter", "step")] = v
            out[f"step{k + 1}.grad_norm"] = np.float64(norm)
            out[f"step{k + 1}.lr"] = np.float64(lr)
        for name in t_terms:
            tols[name.replace("iter", "step")] = opts.loss_tol_first if first else opts.loss_tol
        tols[f"step{k + 1}.grad_norm"] = opts.loss_tol_first if first else opts.loss_tol
        tols[f"step{k + 1}.lr"] = 1e-10
        totals["mmdet"].append(float(t_terms[f"iter{k + 1}.loss.total"]))
        totals["paddle"].append(float(p_terms[f"iter{k + 1}.loss.total"]))
        if first:
            for name, g in t_grads.items():
                torch_out[f"grad.{name}"] = g
                paddle_out[f"grad.{name}"] = p_grads.get(name, np.array([np.nan], np.float32))
                tols[f"grad.{name}"] = opts.grad_tol
            for name in set(p_grads) - set(t_grads):
                paddle_out[f"grad.{name}"] = p_grads[name]

    for prefix, t_vals, p_vals in (("param", torch_side.parameters(), paddle_side.parameters()),
                                   ("momentum", torch_side.momentum_buffers(),
                                    paddle_side.momentum_buffers())):
        for name, v in t_vals.items():
            torch_out[f"{prefix}.{name}"] = v
            paddle_out[f"{prefix}.{name}"] = p_vals.get(name, np.array([np.nan], np.float32))
            tols[f"{prefix}.{name}"] = opts.param_tol

    tensors: list[TensorDiff] = [
        diff_arrays(name, torch_out[name], paddle_out[name], rel_tol=tols[name], mean_tol=tols[name])
        for name in torch_out]
    for name in sorted(paddle_out.keys() - torch_out.keys()):
        tensors.append(missing_row(name, test_shape=np.shape(paddle_out[name]),
                                   reason="missing in mmdet"))
    reprod = reprod_log_diff(paddle_out, torch_out, opts.reports, "backward", opts.loss_tol)
    passed = all(t.passed for t in tensors)

    step_rows = []
    for k in range(opts.steps):
        t, p = totals["mmdet"][k], totals["paddle"][k]
        step_rows.append([k + 1, t, p, abs(p - t) / abs(t), float(torch_out[f"step{k + 1}.lr"]),
                          float(torch_out[f"step{k + 1}.grad_norm"]),
                          float(paddle_out[f"step{k + 1}.grad_norm"])])
    ranked = sorted((t for t in tensors if t.name.startswith("param.")), key=lambda t: -t.rel_max)
    moved = [float(np.abs(torch_out[f"param.{n}"] - v).max())
             for n, v in build_initial_params(ckpts).items() if f"param.{n}" in torch_out]
    meta = {
        "seed": opts.seed,
        "input_shape": list(parse_shape(opts.shape)),
        "steps": opts.steps,
        "base_lr": opts.lr,
        "warmup_iters": warmup,
        "largest_parameter_change_mmdet": max(moved) if moved else 0.0,
        "checkpoint": str(ckpts.torch_path),
        "checkpoint_sha256": ckpts.sha256,
        "checkpoint_synthetic": ckpts.synthetic,
        **{k: round(v, 3) for k, v in seconds.items()},
    }
    result = StageResult(
        stage="backward",
        title="Backward: training steps, mmdet vs Paddle",
        passed=passed,
        tensors=tensors,
        layers=[],
        thresholds={"step-1 losses and gradients (rel)": opts.grad_tol,
                    "later losses, grad norms (rel)": opts.loss_tol,
                    "parameters, momentum after the last step (rel)": opts.param_tol, "lr": 1e-10},
        meta=meta,
        env=environment_info(),
        extra_tables=[
            ("Loss per step", ["step", "mmdet total", "paddle total", "rel diff", "lr",
                               "grad norm mmdet", "grad norm paddle"], step_rows),
            ("Parameters ranked by difference after the last step",
             ["parameter", "max abs diff", "rel", "pass"],
             [[t.name[len("param."):], t.max_abs, t.rel_max, t.passed] for t in ranked[:40]]),
        ],
        figures=[("Total loss per step and relative difference", loss_curve_png(totals["mmdet"],
                                                                              totals["paddle"]))],
        reprod_log=reprod,
    )
    write_stage_report(result, opts.reports)
    return result


def build_initial_params(ckpts) -> dict[str, np.ndarray]:
    from torch_ref.reference import load_mmdet_state_dict

    return {k: v.numpy() for k, v in load_mmdet_state_dict(ckpts.torch_path).items()}


def first_divergence(result: StageResult) -> str | None:
    index = first_failure(result.tensors)
    return None if index is None else result.tensors[index].name
