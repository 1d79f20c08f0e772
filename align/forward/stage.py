"""Forward alignment of the GHM RetinaNet.

The same seeded, normalized images go through mmdet's model and ours in eval
mode. Compared outputs: backbone C2..C5, FPN P3..P7, and per level the head's
``cls_score`` ``(N, A*C, H, W)`` and ``bbox_pred`` ``(N, A*4, H, W)``. Every
leaf layer's output is also diffed, matched by name, to locate the first
divergence. With ``isolate`` every leaf layer of ours is also evaluated on
mmdet's recorded input to that layer, so each layer's own error is measured
apart from what accumulated upstream (`align.engine.isolate`).
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from align.engine.cache import ReferenceCache, cache_key
from align.engine.capture import PaddleComparer, TorchRecorder, perturb_parameter
from align.engine.cli import progress_bar
from align.engine.compare import TensorDiff, diff_arrays, first_failed_name
from align.engine.reprod import reprod_log_diff
from align.engine.isolate import (TorchCallRecorder, isolated_forward, isolation_tables, peak_memory_gb,
                                  spill_store)
from align.engine.report import Headline, StageResult
from align.engine.weights import NameMap
from align.engine.options import cache_option, fresh_option, option
from align.ghm.pair import (GhmStageOptions, build_paddle_model, build_torch_model, check_perturb, parse_shape,
                            prepare_checkpoints, seeded_images)
from align.ghm.suite import reference_sources, reference_threads, reference_versions, write_report
from common.arguments import non_negative_float, positive_float, tensor_shape

DEFAULT_SHAPE = "2x3x800x1344"
# The code that builds and records mmdet's side (part of the cache key): a change to it is a new reference.
REFERENCE_CODE = ("torch_ref", "align.ghm", "align.engine.capture", "align.forward.stage")
BACKBONE_NAMES = ["C2", "C3", "C4", "C5"]
FPN_NAMES = ["P3", "P4", "P5", "P6", "P7"]


@dataclass
class ForwardOptions(GhmStageOptions):
    shape: str = option(DEFAULT_SHAPE, "input NxCxHxW (default %(default)s)", type=tensor_shape(4, channels=3))
    perturb: str | None = option(None, "Paddle parameter to perturb, e.g. backbone.layer3.2.conv2.weight")
    perturb_scale: float = option(1e-3, "the perturbation's std over the parameter's (default %(default)s)",
                                  type=positive_float)
    rel_tol: float = option(1e-5, "bound on max|diff| / max|ref| (default %(default)s)", type=non_negative_float)
    mean_tol: float = option(1e-5, "bound on mean|diff| (default %(default)s)", type=non_negative_float)
    layers: bool = option(True, "skip the layer-by-layer capture", flag="--no-layers")
    # Also every leaf layer on mmdet's recorded input (its own error, float32); the recorded
    # activations are spilled under ``build_dir`` while the layers are compared.
    isolate: bool = option(False, "also every layer on mmdet's recorded input: each layer's own error")
    # Keep mmdet's side in ``build_dir/cache`` and take it from there when it matches (at
    # 2x3x800x1344 its layer records are 6.5 GB on disk, memory-mapped when they are used).
    cache: bool = cache_option()
    # With ``cache``: recompute mmdet's side even when the cache holds it.
    fresh: bool = fresh_option()


def named_outputs(backbone_outs, fpn_outs, cls_scores, bbox_preds, to_numpy) -> dict[str, np.ndarray]:
    """The compared outputs under stable names, in execution order."""
    out = {}
    for name, t in zip(BACKBONE_NAMES, backbone_outs):
        out[f"backbone.{name}"] = to_numpy(t)
    for name, t in zip(FPN_NAMES, fpn_outs):
        out[f"neck.{name}"] = to_numpy(t)
    for name, c, b in zip(FPN_NAMES, cls_scores, bbox_preds):
        out[f"head.cls_score.{name}"] = to_numpy(c)
        out[f"head.bbox_pred.{name}"] = to_numpy(b)
    return out


def run_torch(model, images: np.ndarray, record_layers: bool):
    """mmdet forward, piece by piece so intermediate outputs are kept."""
    import torch

    x = torch.from_numpy(images)
    recorder = TorchRecorder(model)
    with torch.no_grad(), (recorder if record_layers else nullcontext()):
        c = model.backbone(x)
        p = model.neck(c)
        cls_scores, bbox_preds = model.bbox_head(p)
    outputs = named_outputs(c, p, cls_scores, bbox_preds, lambda t: t.detach().numpy().copy())
    return outputs, recorder.records


def run_paddle(model, images: np.ndarray, reference_layers: dict, opts: ForwardOptions):
    import paddle

    x = paddle.to_tensor(images)
    comparer = PaddleComparer(model, reference_layers, rel_tol=opts.rel_tol, mean_tol=opts.mean_tol)
    with paddle.no_grad(), (comparer if opts.layers else nullcontext()):
        c = model.backbone(x)
        p = model.neck(c)
        cls_scores, bbox_preds = model.bbox_head(p)
    outputs = named_outputs(c, p, cls_scores, bbox_preds, lambda t: np.array(t.numpy(), copy=True))
    return outputs, comparer.rows if opts.layers else []


def reference_outputs(ckpts, images: np.ndarray, opts: ForwardOptions):
    """mmdet's outputs and layer records; with ``opts.cache`` from ``build_dir/cache`` when an
    entry matches the checkpoint, the input, the options and the installed reference versions
    (and saved there otherwise). Returns them, mmdet's forward time (0 on a hit) and the cache
    status: "off", "hit", "miss", "mismatch" or "fresh"."""
    from paddle_impl.config import get_config

    key = cache_key({"stage": "forward", "format": 2, "checkpoint": ckpts.sha256, "input_shape": list(images.shape),
                     "seed": opts.seed, "preprocessor": get_config()["data_preprocessor"], "layers": opts.layers,
                     "versions": reference_versions(), "torch_threads": reference_threads(),
                     "code": reference_sources(*REFERENCE_CODE)})
    cache = ReferenceCache(opts.build_dir / "cache")
    arrays = None if opts.fresh or not opts.cache else cache.load("forward", key)
    if arrays is not None:
        outputs = {k[len("out:"):]: v for k, v in arrays.items() if k.startswith("out:")}
        layers = {k[len("layer:"):]: v for k, v in arrays.items() if k.startswith("layer:")}
        return outputs, layers, 0.0, "hit"
    status = "off" if not opts.cache else "fresh" if opts.fresh else cache.last_status
    t0 = time.perf_counter()
    outputs, layers = run_torch(build_torch_model(ckpts), images, opts.layers)
    seconds = time.perf_counter() - t0
    if opts.cache:
        cache.save("forward", key, {**{f"out:{k}": v for k, v in outputs.items()},
                                    **{f"layer:{k}": v for k, v in layers.items()}})
    return outputs, layers, seconds, status


def run_isolated(torch_model, paddle_model, images: np.ndarray, opts: ForwardOptions):
    """Every Paddle leaf layer on mmdet's recorded input; returns the rows, the layer kinds by
    call key and the bytes recorded (spilled to disk under ``opts.build_dir``)."""
    import torch

    with spill_store(True, opts.build_dir / "isolate") as store:
        recorder = TorchCallRecorder(torch_model, store)
        with torch.no_grad(), recorder:
            run_torch(torch_model, images, record_layers=False)
        rows = isolated_forward(recorder.calls, store, paddle_model, NameMap(), rel_tol=opts.rel_tol,
                                mean_tol=opts.mean_tol)
        return rows, {c.key: c.kind for c in recorder.calls}, store.nbytes


def run_forward(opts: ForwardOptions) -> StageResult:
    """Run both models, diff, write ``forward*`` files into ``opts.reports``."""
    shape = parse_shape(opts.shape)
    check_perturb(opts.perturb)
    t0 = time.perf_counter()
    ckpts = prepare_checkpoints(opts.ckpt, opts.seed, opts.build_dir)
    paddle_model = build_paddle_model(ckpts)
    perturb_sigma = None
    if opts.perturb:
        perturb_sigma = perturb_parameter(paddle_model, opts.perturb, scale=opts.perturb_scale,
                                          seed=opts.seed)
    images = seeded_images(shape, opts.seed)
    timings = {"setup_s": time.perf_counter() - t0}

    with progress_bar("forward", total=2) as bar:
        t0 = time.perf_counter()
        torch_out, torch_layers, timings["torch_forward_s"], cache_status = reference_outputs(ckpts, images, opts)
        timings["reference_s"] = time.perf_counter() - t0
        bar.update(1)
        t0 = time.perf_counter()
        paddle_out, layer_rows = run_paddle(paddle_model, images, torch_layers, opts)
        timings["paddle_forward_s"] = time.perf_counter() - t0
        bar.update(1)
    del torch_layers

    tensors: list[TensorDiff] = [
        diff_arrays(name, torch_out[name], paddle_out[name], rel_tol=opts.rel_tol, mean_tol=opts.mean_tol)
        for name in torch_out
    ]
    reprod = reprod_log_diff(paddle_out, torch_out, opts.reports, "forward", opts.mean_tol)
    passed = all(t.passed for t in tensors) and all(r.passed for r in layer_rows)
    isolated: list[TensorDiff] = []
    tables = []
    if opts.isolate:
        t0 = time.perf_counter()
        isolated, kinds, recorded = run_isolated(build_torch_model(ckpts), paddle_model, images, opts)
        timings["isolated_s"] = time.perf_counter() - t0
        passed = passed and all(r.passed for r in isolated)
        tables = isolation_tables(isolated, [], layer_rows, kinds)

    meta = {
        "seed": opts.seed,
        "input_shape": list(shape),
        "input": "seeded 8-bit RGB pixels normalized with the reference mean/std",
        "checkpoint": str(ckpts.torch_path),
        "checkpoint_sha256": ckpts.sha256,
        "checkpoint_synthetic": ckpts.synthetic,
        "paddle_weights": str(ckpts.paddle_path),
        "perturbed_parameter": opts.perturb,
        "perturbation_std": perturb_sigma,
        "layers_compared": len(layer_rows),
        # "hit": mmdet's side came from build/cache (its forward time is then 0); "off": no cache.
        "reference_cache": cache_status,
        **{k: round(v, 3) for k, v in timings.items()},
    }
    if opts.isolate:
        meta.update(isolated_layer_calls=len(isolated), recorded_gb=round(recorded / 2 ** 30, 2),
                    peak_memory_gb=round(peak_memory_gb(), 2))
    return write_report(StageResult(
        stage="forward",
        title="Forward: mmdet GHM RetinaNet vs Paddle",
        passed=passed,
        tensors=tensors,
        # With isolation the layer rows are each layer's own error; the accumulated ones are in a table
        # and drawn behind them on the layer figure.
        layers=isolated if opts.isolate else layer_rows,
        accumulated_layers=layer_rows if opts.isolate else [],
        thresholds={"rel_max": opts.rel_tol, "mean_abs": opts.mean_tol},
        meta=meta,
        extra_tables=tables,
        reprod_log=reprod,
        reprod_log_check=opts.mean_tol,
        headline=(Headline.worst(isolated, opts.rel_tol, "worst own layer error (isolated)") if opts.isolate
                  else Headline.worst(tensors, opts.rel_tol, "worst output, max|diff| / max|ref|")),
        seconds={"mmdet": timings["torch_forward_s"], "paddle": timings["paddle_forward_s"]},
    ), opts.reports)


def first_divergence(result: StageResult) -> str | None:
    """Name of the first failing layer (or compared output) in execution order."""
    return first_failed_name(result.layers, result.tensors)
