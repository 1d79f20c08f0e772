"""The training loop: data, model, optimizer, schedule, checkpoints and evaluation of one run.

:class:`Trainer` is what ``python -m paddle_impl.train`` builds and runs (see
that module for the options, outputs and faults). Each iteration is one
:func:`~paddle_impl.engine.train_step.train_step`.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import paddle
import paddle.distributed as dist
from paddle import nn

from paddle_impl.config import get_config
from paddle_impl.data.coco_layout import coco_paths
from paddle_impl.data.dataset import CocoDetection, build_dataloader, check_image_files
from paddle_impl.data.samplers import resume_position
from paddle_impl.engine import checkpoint as ckpt
from common.atomic_write import check_writable_dir, remove_stale_temp_files, write_json
from paddle_impl.engine.fault_injection import maybe_fail
from paddle_impl.engine.lr_schedule import WarmupMultiStepLR
from paddle_impl.engine.optimizer import SGD, scaled_lr
from paddle_impl.engine.run_config import changes_on_resume, training_config
from paddle_impl.engine.report import (ThroughputLog, append_jsonl, format_eta, read_mmdet_log, render_report,
                                       truncate_jsonl)
from paddle_impl.engine.train_step import LossForward, train_step
from paddle_impl.engine.weights import load_weights, load_weights_file, set_ghm_buffers
from common.errors import InputError
from paddle_impl.errors import DataError
from paddle_impl.evaluation.coco_eval import BBOX_METRIC_NAMES
from paddle_impl.evaluation.evaluate import evaluate
from paddle_impl.model.detector import RetinaNet

SMOKE_EPOCHS = 2
SMOKE_SCALE = (320, 192)  # (w, h) the image is resized to fit, keeping its ratio


def seed_everything(seed: int) -> None:
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
    before any output is written (except the generated tiny COCO); a resume
    that does not fit its checkpoint raises it before the tiny COCO too.
    """

    def __init__(self, args: argparse.Namespace, init_files: dict[str, str] | None = None):
        """``args`` as :func:`paddle_impl.train.parse_args` returns them; ``init_files`` the
        Paddle files to read for ``--init`` / ``--init-backbone`` when they differ from the
        arguments (a converted PyTorch checkpoint)."""
        self.args = args
        self.init_files = {"init": args.init, "init_backbone": args.init_backbone, **(init_files or {})}
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
        self.total_batch = args.batch_size * self.world_size
        self.base_lr = scaled_lr(self.total_batch, cfg) if args.lr == "auto" else float(args.lr)
        self.config = training_config(self.args, self.cfg, epochs=self.epochs, base_lr=self.base_lr,
                                      scale=self.scale or self.cfg["data"]["scale"])
        self.config_changes: list[dict[str, Any]] = []
        # A resume that does not fit its checkpoint stops before any input is read or output written.
        resumed = self._resume_state() if self.resume_from else None

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
        # Every rank predicts its own share of the validation set (no padding).
        self.val_loader = build_dataloader(self.val_set, num_workers=args.num_workers,
                                           rank=self.rank, world_size=self.world_size)
        self.iters_per_epoch = len(self.loader)
        self.total_iters = self.iters_per_epoch * self.epochs
        if args.max_iters:
            self.total_iters = min(self.total_iters, args.max_iters)

        seed_everything(args.seed)
        self.model = RetinaNet.from_config(cfg)
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
        # The clock of the ETA: iterations done by this process since it started training.
        self._started, self._done_here = time.perf_counter(), 0
        if resumed:
            self._restore(resumed)
        if self.world_size > 1:
            self._check_same_start()

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
            from paddle_impl.data.tiny_coco import generate
            generate(root, seed=self.args.seed, overwrite=True)
        if self.world_size > 1:
            dist.barrier()  # the others read what rank 0 generated
        return coco_paths(root)

    def _init_weights(self) -> None:
        if self.args.init_backbone:
            state = load_weights_file(self.init_files["init_backbone"], "--init-backbone")
            load_weights(self.model, state, f"--init-backbone {self.args.init_backbone}", prefix="backbone.")
        if self.args.init:
            state = load_weights_file(self.init_files["init"], "--init")
            load_weights(self.model, state, f"--init {self.args.init}")

    def _resume_state(self) -> dict[str, Any]:
        """The checkpoint to continue from, once it fits this command: the same number of
        processes, and the same training options unless ``--allow-config-change``, with which
        each differing option is added to ``config_changes`` (`run_config.changes_on_resume`)."""
        state = ckpt.load_checkpoint(self.resume_from)
        source = f"--resume {self.resume_from}"
        if state["world_size"] != self.world_size:
            raise InputError(f"{source}: saved by {state['world_size']} processes, this run has "
                             f"{self.world_size}: the per-process GHM state and sampler shares differ")
        self.config_changes = changes_on_resume(state, self.config, source, self.args.allow_config_change,
                                                report=self.main)
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        """Load a checkpoint: this rank's GHM and RNG state, the shared rest."""
        source = f"--resume {self.resume_from}"
        load_weights(self.model, state["model"], source)
        set_ghm_buffers(self.model, state["ghm_per_rank"][self.rank])
        try:
            self.optimizer.set_state_dict(state["optimizer"])
            self.schedule.set_state_dict(state["lr_schedule"],
                                         require_same_schedule=not self.args.allow_config_change)
        except (KeyError, ValueError) as err:
            raise InputError(f"{source}: {err}") from None
        ckpt.set_rng_state(state["rng"][self.rank])
        self.iter = int(state["iter"])
        self.position = dict(state["sampler"])
        if self.position["batch"] >= self.iters_per_epoch:
            # A larger batch or a smaller data set (--allow-config-change) ends this epoch
            # before the saved position: the next one begins.
            self.position = {"epoch": self.position["epoch"] + 1, "batch": 0}
        # With changed options the checkpoint of this very iteration is written again, so that it
        # records the options training continues with.
        self._saved_at = self.iter if state.get("config", self.config) == self.config else -1

    def _check_same_start(self) -> None:
        """Every rank starts at the same iteration. On several machines each reads the checkpoint
        from its own ``--work-dir``; a node that does not see rank 0's ``latest.ckpt`` would
        silently train from scratch beside the others. All ranks raise the same error."""
        starts = _gather([self.iter, str(self.resume_from) if self.resume_from else None], self.world_size)
        if len({it for it, _ in starts}) > 1:
            detail = ", ".join(f"rank {r}: " + (f"iteration {it} from {src}" if src else "no checkpoint")
                               for r, (it, src) in enumerate(starts))
            raise InputError(f"--resume: the ranks would start at different iterations ({detail}); "
                             "every node must read the same checkpoint: put --work-dir on a shared "
                             "file system, or copy rank 0's latest.ckpt to each node's --work-dir")

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
            "config": self.config,
            "config_changes": self.config_changes,
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
            "eval_backend": a.eval_backend,
            "config_changes": self.config_changes,
        }

    def _evaluate(self, epoch: int) -> None:
        """Every rank predicts its share of the validation set with the bare model (no
        collective, so unequal shares are fine); rank 0 gathers, scores and logs while the
        others wait for it at the barrier."""
        result = evaluate(self.model, self.val_loader, self.val_set, self.work_dir / "val_results.bbox.json",
                          rank=self.rank, world_size=self.world_size, backend=self.args.eval_backend)
        if self.main:
            metrics, count = result.metrics, result.num_detections
            record = {"epoch": epoch, "iter": self.iter, "num_detections": count}
            record.update({k: metrics.get(k) for k in BBOX_METRIC_NAMES})
            record.update(eval_time=result.seconds, predict_time_per_rank=result.predict_seconds,
                          images_per_rank=result.images_per_rank)
            append_jsonl(self.work_dir / "eval.jsonl", record)
            print(f"[eval] epoch {epoch} iter {self.iter}: bbox_mAP {record['bbox_mAP']} "
                  f"mAP_50 {record['bbox_mAP_50']} ({count} detections)", file=sys.stderr)
        self.model.train()
        if self.world_size > 1:
            dist.barrier()

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
        args = self.args
        self._started, self._done_here = time.perf_counter(), 0
        evaluated_at = -1
        # Without a progress bar the log lines say how training goes (per process: its own images).
        lines = ThroughputLog(get_config()["runtime"]["log_interval"], self.total_iters) \
            if bar is None and self.main else None
        while self.iter < self.total_iters:
            epoch = self.position["epoch"]
            if self.position["batch"] > 0:
                self.loader.batch_sampler.load_state_dict(self.position)
            else:
                self.loader.batch_sampler.set_epoch(epoch)
            t_data = time.perf_counter()
            for batch in self.loader:
                record = self.train_iteration(batch, epoch, t_data)
                if bar is not None:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                    bar.update(1)
                if lines is not None:
                    line = lines.add(record, len(batch["img_ids"]))
                    if line:
                        print(line, file=sys.stderr)
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
                if self.main:
                    ckpt.prune_epoch_weights(self.work_dir, epoch + 1, args.keep_checkpoints)
                if args.eval_interval and (epoch + 1) % args.eval_interval == 0:
                    self._evaluate(epoch + 1)
                    evaluated_at = self.iter
        self.save_checkpoint()
        self.save_weights("model_final.pdparams")
        if evaluated_at != self.iter:
            self._evaluate(self.position["epoch"] + (1 if self.position["batch"] else 0))

    def train_iteration(self, batch: dict[str, Any], epoch: int, t_data: float) -> dict[str, Any] | None:
        """One iteration of the loop on ``batch``: the training step, the sampler position after
        it and the iteration's log record.

        ``epoch`` is 0-based; ``t_data`` the ``time.perf_counter()`` at which the
        loop asked the loader for ``batch``, so the record's ``data_time`` is
        the wait for it and ``time`` the whole iteration. Rank 0 appends the
        record to ``log.jsonl`` and returns it; other ranks return None. The
        loop and ``bench.overhead`` (which times an iteration) both run it.
        """
        t_start = time.perf_counter()
        maybe_fail(self.rank, self.iter + 1)
        step = train_step(self.loss_forward, self.optimizer, self.schedule, batch, iteration=self.iter + 1)
        values, grad_norm = step.log_values(), step.grad_norm
        self.iter += 1
        self._done_here += 1
        pos = resume_position(batch["keys"])
        self.position = ({"epoch": epoch + 1, "batch": 0} if pos["batch"] >= self.iters_per_epoch
                         else pos)
        spread = None
        if self.world_size > 1:
            prints = _gather(self._fingerprint(), self.world_size)
            spread = float(np.max(np.abs(np.array(prints) - np.array(prints[0]))))
        now = time.perf_counter()
        per_iter = (now - self._started) / self._done_here
        eta = per_iter * (self.total_iters - self.iter)
        if not self.main:
            return None
        record = {"iter": self.iter, "epoch": epoch + 1, "iter_in_epoch": pos["batch"],
                  **values, "grad_norm": grad_norm, "time": now - t_data,
                  "data_time": t_start - t_data, "eta_s": eta, "eta": format_eta(eta)}
        if spread is not None:
            record["param_rank_spread"] = spread
        append_jsonl(self.work_dir / "log.jsonl", record)
        return record

    def _fingerprint(self) -> list[float]:
        return _param_fingerprint(self.model).numpy().tolist()
