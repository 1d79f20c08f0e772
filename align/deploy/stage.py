"""Deployment alignment: mmdet's predict, our dynamic graph, Paddle Inference and ONNX Runtime.

On the tiny COCO's val images and the same weights, four paths predict:

- ``mmdet``: its test pipeline, data preprocessor and ``model.predict``;
- ``dynamic``: our test pipeline and ``Collate``, our network in Paddle's
  dynamic graph, :func:`paddle_impl.boxes.postprocess.predict_boxes`;
- ``paddle-inference`` (oneDNN on, unless ``--no-onednn``) and ``onnxruntime``:
  the folder ``python -m paddle_impl.export`` writes from the same weights, each
  image prepared as ``python -m paddle_impl.infer`` prepares it (from the
  export's ``deploy.json``), the detections those of the exported program's own
  post-processing (:func:`paddle_impl.boxes.postprocess.detect`, the code
  ``predict_boxes`` runs in the dynamic graph).

Compared per image:

- preprocessing: the network input and ``img_shape`` / ``scale_factor`` of the
  infer path against the dynamic graph's (exactly: the same code on the same
  values) and the dynamic graph's input against mmdet's (``--input-atol``, as
  the data stage);
- raw head outputs, every level's ``cls_score`` and ``bbox_pred``: the dynamic
  graph against mmdet, each engine against the dynamic graph
  (max|diff| / max|ref| and mean|diff| <= ``--raw-rtol``, 1e-5);
- detections of every path against mmdet's, with the predict stage's bounds and
  pairing (:func:`align.predict.stage.compare_run`: count and labels exactly,
  boxes 1e-3 px, scores 1e-5).

As in the predict stage, the seeded default checkpoint runs twice: as given
(no score passes 0.05) and ``sharpened`` (its classifier rescaled so that NMS,
the top-k cuts and ``max_per_img`` act). ``--perturb NAME`` adds noise to one
parameter of the exported copy only: the engines' rows must then fail and the
first failing row names the first output it reaches.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from align.engine.cli import progress
from align.engine.compare import TensorDiff, diff_arrays, first_failed_name
from align.engine.options import option
from align.engine.reprod import reprod_log_diff
from align.engine.report import Headline, StageResult, layer_profile_png
from align.engine.rows import abs_row, exact_row
from align.ghm.pair import GhmStageOptions, build_paddle_model, build_torch_model, check_perturb
from align.ghm.pipelines import mmdet_batch
from align.ghm.suite import write_report
from align.predict.stage import compare_run, test_sets_and_runs
from common.arguments import format_size, non_negative_float, parse_size, positive_float
from paddle_impl.config import get_config
from paddle_impl.deploy.backends import BACKENDS
from paddle_impl.deploy.model_dir import output_names

# Four paths, two checkpoints and two exports per run: at the config's 1333x800 the stage took
# 8 minutes on 2 shared cores, at 640x384 (under a quarter of the pixels) it fits `make align`;
# --scale 1333x800 runs the config's size.
DEFAULT_SCALE = (640, 384)
PATHS = ("dynamic",) + BACKENDS


@dataclass
class DeployOptions(GhmStageOptions):
    scale: tuple[int, int] = option(DEFAULT_SCALE, f"test Resize bound WxH for every path (default "
                                                   f"{format_size(DEFAULT_SCALE)})", type=parse_size)
    perturb: str | None = option(None, "parameter of the exported copy to perturb, e.g. neck.fpn_convs.0.conv.weight")
    perturb_scale: float = option(1e-3, "the perturbation's std over the parameter's (default %(default)s)",
                                  type=positive_float)
    onednn: bool = option(True, "run Paddle Inference without oneDNN", flag="--no-onednn")
    raw_rtol: float = option(1e-5, "bound on raw outputs' max|diff| / max|ref| and mean|diff| (default %(default)s)",
                             type=non_negative_float)
    input_atol: float = option(1e-6, "bound on the network input's |diff| against mmdet's (default %(default)s)",
                               type=non_negative_float)
    box_atol: float = option(1e-3, "bound on the boxes' |diff|, pixels (default %(default)s)",
                             type=non_negative_float)
    score_atol: float = option(1e-5, "bound on the scores' |diff| (default %(default)s)", type=non_negative_float)


class Prediction(NamedTuple):
    """One image on one path: its network input, meta, raw head outputs and detections."""

    images: np.ndarray
    meta: dict
    raw: list[np.ndarray]
    detections: dict[str, np.ndarray]


def _detections(img_id: int, bboxes, scores, labels) -> dict[str, np.ndarray]:
    return {"img_id": img_id, "bboxes": np.asarray(bboxes).reshape(-1, 4), "scores": np.asarray(scores),
            "labels": np.asarray(labels).astype(np.int64)}


def mmdet_path(model, dataset) -> list[Prediction]:
    """mmdet per image; its head's outputs taken by a forward hook during ``predict``."""
    import torch

    captured = []
    hook = model.bbox_head.register_forward_hook(lambda module, args, out: captured.append(out))
    out = []
    try:
        with torch.no_grad():
            for i in range(len(dataset)):
                captured.clear()
                data = model.data_preprocessor(mmdet_batch([dataset[i]]), False)
                sample = data["data_samples"][0]
                pred = model.predict(data["inputs"], data["data_samples"], rescale=True)[0].pred_instances
                cls_scores, bbox_preds = captured[0]
                out.append(Prediction(
                    data["inputs"].numpy(),
                    {"img_shape": tuple(sample.img_shape), "scale_factor": tuple(sample.scale_factor)},
                    [t.numpy() for t in list(cls_scores) + list(bbox_preds)],
                    _detections(int(dataset.get_data_info(i)["img_id"]), pred.bboxes.numpy(), pred.scores.numpy(),
                                pred.labels.numpy())))
    finally:
        hook.remove()
    return out


def dynamic_path(model, dataset) -> list[Prediction]:
    """Our dynamic graph per image: the body of ``RetinaNet.predict`` with its raw outputs kept."""
    import paddle

    from paddle_impl.boxes.postprocess import predict_boxes
    from paddle_impl.data.transforms import Collate

    collate = Collate()
    out = []
    for i in range(len(dataset)):
        batch = collate.batch([dataset[i]])
        meta = {"img_shape": batch["img_shapes"][0], "scale_factor": batch["scale_factors"][0]}
        with paddle.no_grad():
            cls_scores, bbox_preds = model(batch["images"])
        det = predict_boxes(cls_scores, bbox_preds, [meta], cfg=model.test_cfg)[0]
        out.append(Prediction(batch["images"].numpy(), meta, [t.numpy() for t in cls_scores + bbox_preds],
                              _detections(int(batch["img_ids"][0]), det.bboxes.numpy(), det.scores.numpy(),
                                          det.labels.numpy())))
    return out


def engine_path(engine, model_dir, dataset) -> list[Prediction]:
    """An engine per image, each image prepared and post-processed as ``paddle_impl.infer`` does."""
    from paddle_impl.infer import engine_detections, preprocessing
    from paddle_impl.predict import prepare_image

    spec = model_dir.spec()
    scale, collate = preprocessing(spec)
    out = []
    for record in dataset.records:
        images, meta = prepare_image(record.img_id, record.path, scale, collate)
        raw, (det,) = engine_detections(engine, images, [meta])
        out.append(Prediction(images.numpy(), meta, raw, _detections(record.img_id, det.bboxes.numpy(),
                                                                        det.scores.numpy(), det.labels.numpy())))
    return out


def export_copy(ckpts, out: Path, opts: DeployOptions) -> tuple[Path, float | None]:
    """The checkpoint's Paddle weights exported into ``out`` (perturbed when asked);
    returns the folder and the perturbation's std."""
    from align.engine.capture import perturb_parameter
    from paddle_impl.export import export

    model = build_paddle_model(ckpts)
    sigma = None
    if opts.perturb:
        sigma = perturb_parameter(model, opts.perturb, scale=opts.perturb_scale, seed=opts.seed)
    export(str(ckpts.paddle_path), out, opts.scale, model=model)
    return out, sigma


def raw_rows(key: str, ref: list[np.ndarray], got: list[np.ndarray], rtol: float) -> list[TensorDiff]:
    return [diff_arrays(f"{key}.{name}", r, g, rel_tol=rtol, mean_tol=rtol, ref_label="reference",
                        test_label=key.rsplit(".", 1)[-1])
            for name, r, g in zip(output_names(len(ref) // 2), ref, got)]


def preprocessing_rows(key: str, mm: Prediction, dyn: Prediction, engine: Prediction,
                       opts: DeployOptions) -> list[TensorDiff]:
    rows = [abs_row(f"{key}.input.dynamic_vs_mmdet", mm.images, dyn.images, opts.input_atol),
            exact_row(f"{key}.input.infer_vs_dynamic", dyn.images, engine.images)]
    for field in ("img_shape", "scale_factor"):
        rows.append(exact_row(f"{key}.{field}.dynamic_vs_mmdet", np.asarray(mm.meta[field], np.float64),
                              np.asarray(dyn.meta[field], np.float64)))
        rows.append(exact_row(f"{key}.{field}.infer_vs_dynamic", np.asarray(dyn.meta[field], np.float64),
                              np.asarray(engine.meta[field], np.float64)))
    return rows


def run_deploy(opts: DeployOptions) -> StageResult:
    """Predict on the four paths, diff, write ``deploy*`` files into ``opts.reports``."""
    from paddle_impl.deploy.backends import open_engine
    from paddle_impl.deploy.model_dir import ModelDir

    check_perturb(opts.perturb)
    root, mm_ds, our_ds, runs = test_sets_and_runs(opts)

    rows: list[TensorDiff] = []
    table = []
    torch_out: dict[str, np.ndarray] = {}
    paddle_out: dict[str, np.ndarray] = {}
    seconds = {"mmdet": 0.0, **{path: 0.0 for path in PATHS}, "export": 0.0}
    sigma = None
    exports = {}
    for name, ckpts in progress(runs, "deploy"):
        t0 = time.perf_counter()
        mm = mmdet_path(build_torch_model(ckpts), mm_ds)
        seconds["mmdet"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        paths = {"dynamic": dynamic_path(build_paddle_model(ckpts), our_ds)}
        seconds["dynamic"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        folder, sigma = export_copy(ckpts, opts.build_dir / "deploy" / name, opts)
        exports[name] = str(folder)
        seconds["export"] += time.perf_counter() - t0
        for backend in BACKENDS:
            t0 = time.perf_counter()
            engine = open_engine(backend, ModelDir(folder), onednn=opts.onednn)
            paths[backend] = engine_path(engine, ModelDir(folder), our_ds)
            seconds[backend] += time.perf_counter() - t0

        for i, ref in enumerate(mm):
            key = f"{name}.img{ref.detections['img_id']}"
            for backend in BACKENDS:
                rows += preprocessing_rows(f"{key}.{backend}", ref, paths["dynamic"][i], paths[backend][i], opts)
            rows += raw_rows(f"{key}.raw.dynamic", ref.raw, paths["dynamic"][i].raw, opts.raw_rtol)
            for backend in BACKENDS:
                rows += raw_rows(f"{key}.raw.{backend}", paths["dynamic"][i].raw, paths[backend][i].raw,
                                 opts.raw_rtol)
        for path in PATHS:
            r, t = compare_run(f"{name}.{path}", [p.detections for p in mm],
                               [p.detections for p in paths[path]], opts, torch_out, paddle_out)
            rows += r
            table += t

    reprod = reprod_log_diff(paddle_out, torch_out, opts.reports, "deploy", opts.score_atol)
    raw = [r for r in rows if ".raw." in r.name]
    meta = {
        "seed": opts.seed,
        "tiny_coco": str(root),
        "resize_scale": list(opts.scale),
        "test_cfg": get_config()["test_cfg"],
        "onednn": opts.onednn,
        "exports": exports,
        "perturbed_parameter": opts.perturb,
        "perturbation_std": sigma,
        "checkpoints": {name: {"path": str(c.torch_path), "sha256": c.sha256} for name, c in runs},
        "detections_per_run": {name: int(sum(row.detections_mmdet for row in table if row.run == f"{name}.dynamic"))
                               for name, _ in runs},
        "worst_raw_rel": max((r.rel_max for r in raw), default=float("nan")),
        **{f"{k}_s": round(v, 2) for k, v in seconds.items()},
    }
    return write_report(StageResult(
        stage="deploy",
        title="Deploy: mmdet's predict vs our dynamic graph, Paddle Inference and ONNX Runtime",
        passed=all(row.passed for row in rows),
        tensors=rows,
        thresholds={"raw outputs (max|diff|/max|ref|, mean|diff|)": opts.raw_rtol,
                    "network input vs mmdet (abs)": opts.input_atol, "boxes (abs px)": opts.box_atol,
                    "scores (abs)": opts.score_atol, "counts, labels, infer path's input": "exact"},
        meta=meta,
        extra_tables=[("Detections per run, path and image",
                       ["run.path", "img_id", "mmdet dets", "path dets", "max score", "min score",
                        "max |box diff| px", "max |score diff|", "reordered"], table)],
        reprod_log=reprod,
        reprod_log_threshold=opts.score_atol,
        reprod_log_check=opts.score_atol,
        headline=Headline.worst(raw, opts.raw_rtol, "worst raw output, max|diff| / max|ref|"),
        figures=[(RAW_FIGURE, layer_profile_png(raw, opts.raw_rtol, xlabel="raw output, by run, image and path"))],
        seconds={k: round(v, 2) for k, v in seconds.items()},
    ), opts.reports)


RAW_FIGURE = ("Raw head outputs of every path and image: the dynamic graph against mmdet, Paddle Inference and "
              "ONNX Runtime against the dynamic graph; max|diff| / max|ref| of each output (blue within the bound, "
              "red over it), dashed: the bound")


def first_divergence(result: StageResult) -> str | None:
    return first_failed_name(result.tensors)
