"""Per-image inference latency: mmdet eager, our dynamic graph, Paddle Inference (oneDNN), ONNX Runtime.

    python -m bench.bench_infer [--repeats 3] [--batches 1,2] [--size 1333x800] [--threads N]
                                [--ckpt mmdet.pth] [--out reports/bench_infer.json]

Each path takes a seeded batch of images the size the test pipeline makes of
a 1333x800 picture (padded to 800x1344) and returns detections:

* mmdet: ``model.predict`` of the model built from mmdet's config (network and
  its post-processing, NMS from mmcv's compiled ops);
* dynamic: our ``RetinaNet.predict`` in Paddle's dynamic graph;
* paddle-inference: the exported program (network and post-processing) on
  Paddle Inference with oneDNN, as ``python -m paddle_impl.infer`` runs it;
* onnxruntime: the exported ONNX model (network and post-processing) on ONNX
  Runtime's CPU provider, image by image (its NMS is converted for one image).

Every path's time includes its post-processing, from the network input to the
detections.

The ceiling. The network's convolutions are counted (operations per image,
by hooks on mmdet's model) and one 3x3 256->256 convolution at the P3 head's
size is timed in torch and in ONNX Runtime: printed are each path's
effective speed at the smallest batch, the single convolution's speed on
both, and the best ratio to mmdet ONNX Runtime could reach if every
convolution ran at its single-convolution speed and nothing else took time.

Weights: the seeded checkpoint with its classifier sharpened as in the
predict stage (``align.predict.stage.sharpened_checkpoint``), so the
post-processing has candidates to filter, sort and suppress; ``--ckpt`` takes
an mmdet checkpoint instead. The export is made once per run into a temporary
folder. Per batch size each path runs once to warm up, then ``--repeats``
times, the paths taking turns so that a change of load on the shared machine
hits them alike; reported is the median time of a call divided by the batch
size, and its ratio to mmdet's (above 1: faster than mmdet). All four use
``--threads`` threads (default: the cores available).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("GLOG_minloglevel", "2")

from bench.machine import alternating_medians_ms, load_average, machine_info, set_threads  # noqa: E402
from common.arguments import non_negative, parse_size, positive  # noqa: E402
from common.atomic_write import write_json  # noqa: E402

PATHS = ("mmdet", "dynamic", "paddle-inference", "onnxruntime")


def mmdet_runner(model, images):
    """``model.predict`` on ``images`` ``(B, 3, H, W)`` torch, metas of an unscaled H x W picture."""
    import torch
    from mmdet.structures import DetDataSample

    height, width = images.shape[-2:]
    samples = []
    for _ in range(images.shape[0]):
        sample = DetDataSample()
        sample.set_metainfo({"img_shape": (height, width), "ori_shape": (height, width), "scale_factor": (1.0, 1.0),
                             "pad_shape": (height, width), "batch_input_shape": (height, width)})
        samples.append(sample)

    def run():
        with torch.no_grad():
            return model.predict(images, samples, rescale=True)
    return run


class Paths:
    """The four paths' models and engines, built once: mmdet's model, ours, and the two
    engines on an export of ours made into ``folder``."""

    def __init__(self, ckpts, threads: int, folder: str):
        from pathlib import Path

        from align.ghm.pair import build_paddle_model, build_torch_model
        from paddle_impl.deploy.backends import open_engine
        from paddle_impl.deploy.model_dir import ModelDir
        from paddle_impl.export import export

        self.torch_model = build_torch_model(ckpts)
        self.model = build_paddle_model(ckpts)
        # The export converts the layer it is given to a static graph: a second copy goes there.
        target = export(str(ckpts.paddle_path), Path(folder), model=build_paddle_model(ckpts))
        self.engines = {b: open_engine(b, ModelDir(target.root), threads=threads)
                        for b in ("paddle-inference", "onnxruntime")}

    def runners(self, images_np) -> dict:
        """One callable per path on ``images_np`` ``(B, 3, H, W)`` float32."""
        import paddle
        import torch

        from paddle_impl.infer import engine_detections

        height, width = images_np.shape[-2:]
        metas = [{"img_shape": (height, width), "scale_factor": (1.0, 1.0)}] * images_np.shape[0]
        images = paddle.to_tensor(images_np)
        runners = {"mmdet": mmdet_runner(self.torch_model, torch.from_numpy(images_np)),
                   "dynamic": lambda: self.model.predict(images, metas)}
        for name, engine in self.engines.items():
            runners[name] = (lambda e: lambda: engine_detections(e, images, metas))(engine)
        return runners


def measure(paths: Paths, batch: int, size_hw: tuple[int, int], repeats: int, seed: int) -> dict:
    from align.ghm.pair import seeded_images

    runners = paths.runners(seeded_images((batch, 3) + size_hw, seed))
    times = {name: [] for name in PATHS}
    for name in PATHS:
        runners[name]()  # warm-up: first-call allocations, oneDNN primitive creation
    for _ in range(repeats):
        for name in PATHS:
            t0 = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - t0)
    per_image = {name: statistics.median(t) / batch for name, t in times.items()}
    return {"batch": batch, "input_hw": list(size_hw), "per_image_s": per_image, "all_calls_s": times,
            "ratio_to_mmdet": {name: per_image["mmdet"] / per_image[name] for name in PATHS}}


def conv_flops(torch_model, size_hw: tuple[int, int]) -> float:
    """Floating-point operations (2 per multiply-add) of every convolution of
    ``torch_model``'s ``_forward`` on one ``(3, H, W)`` input, counted by
    forward hooks on its ``Conv2d`` modules."""
    import torch

    total = [0]

    def count(module, inputs, output):
        taps = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        total[0] += 2 * taps * output.numel()

    hooks = [m.register_forward_hook(count) for m in torch_model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            torch_model._forward(torch.zeros((1, 3) + tuple(size_hw)))
    finally:
        for hook in hooks:
            hook.remove()
    return float(total[0])


def conv_speeds(size_hw: tuple[int, int], threads: int, repeats: int = 5, channels: int = 256) -> dict:
    """GFLOP/s of one 3x3 ``channels`` -> ``channels`` convolution at ``(H/8, W/8)``,
    the shape of the head's convolutions on P3, which hold most of the
    network's operations: torch's (mmdet's kernels) and ONNX Runtime's on the
    same seeded weights and input, medians of ``repeats`` calls after one, taking turns."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    height, width = -(-size_hw[0] // 8), -(-size_hw[1] // 8)
    weight = rng.standard_normal((channels, channels, 3, 3), dtype=np.float32) * 0.02
    x = rng.standard_normal((1, channels, height, width), dtype=np.float32)
    flops = 2.0 * channels * 9 * channels * height * width

    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(weight))
    tx = torch.from_numpy(x)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(weight, "w")])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7).SerializeToString(),
        options, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        medians_ms = alternating_medians_ms([lambda: conv(tx), lambda: session.run(None, {"x": x})], repeats)
    speeds = {name: flops / (ms / 1e3) / 1e9 for name, ms in zip(("mmdet", "onnxruntime"), medians_ms)}
    return {"shape": [1, channels, height, width], "gflop_per_s": speeds}


def ceiling(paths: Paths, size_hw: tuple[int, int], threads: int, batch_one: dict) -> dict:
    """What the network's convolutions allow: their operations, each path's
    effective speed at batch 1, and ONNX Runtime's best ratio to mmdet if all
    of them ran at its single-convolution speed and nothing else took time."""
    flops = conv_flops(paths.torch_model, size_hw)
    speeds = conv_speeds(size_hw, threads)
    best_s = flops / (speeds["gflop_per_s"]["onnxruntime"] * 1e9)
    return {"conv_gflop": flops / 1e9, "single_conv": speeds,
            "effective_gflop_per_s": {name: flops / 1e9 / t for name, t in batch_one["per_image_s"].items()},
            "onnxruntime_floor_s": best_s,
            "onnxruntime_best_ratio_to_mmdet": batch_one["per_image_s"]["mmdet"] / best_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive, default=3, help="timed calls per path and batch size")
    parser.add_argument("--batches", default="1,2", help="comma-separated batch sizes (default %(default)s)")
    parser.add_argument("--size", type=parse_size, default=(1333, 800),
                        help="picture size WxH the test pipeline fits (default 1333x800; padded to 32)")
    parser.add_argument("--ckpt", help="mmdet checkpoint (default: the seeded one, classifier sharpened)")
    parser.add_argument("--seed", type=non_negative, default=0)
    parser.add_argument("--threads", type=positive, help="CPU threads of every path (default: the cores available)")
    parser.add_argument("--out", default="reports/bench_infer.json", help="JSON report path")
    args = parser.parse_args(argv)
    try:
        batches = [positive(b) for b in args.batches.split(",")]
    except argparse.ArgumentTypeError as err:
        parser.error(f"--batches: {err}")
    pad = 32
    size_hw = tuple(-(-side // pad) * pad for side in args.size[::-1])

    from align.ghm.pair import prepare_checkpoints
    from align.predict.stage import sharpened_checkpoint

    threads = set_threads(args.threads or len(os.sched_getaffinity(0)))
    ckpts = prepare_checkpoints(args.ckpt, args.seed)
    if ckpts.synthetic:
        from align.ghm.pair import BUILD_DIR

        ckpts = prepare_checkpoints(str(sharpened_checkpoint(ckpts, args.seed, BUILD_DIR)), args.seed)
    load_before = load_average()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        paths = Paths(ckpts, threads, os.path.join(tmp, "model"))
        rows = [measure(paths, b, size_hw, args.repeats, args.seed) for b in batches]
        per_image = min(rows, key=lambda row: row["batch"])
        bound = ceiling(paths, size_hw, threads, per_image)
    report = {"machine": machine_info(), "threads": threads, "repeats": args.repeats,
              "checkpoint": str(ckpts.torch_path), "rows": rows, "ceiling": bound,
              "load_average_before": load_before, "load_average_after": load_average(),
              "wall_s": time.perf_counter() - started}
    print(f"per-image latency, median of {args.repeats}, input {size_hw[1]}x{size_hw[0]}, {threads} threads")
    print(f"{'batch':>5} " + " ".join(f"{name:>22}" for name in PATHS))
    for row in rows:
        cells = [f"{row['per_image_s'][n]:7.3f} s ({row['ratio_to_mmdet'][n]:4.2f}x)" for n in PATHS]
        print(f"{row['batch']:>5} " + " ".join(f"{c:>22}" for c in cells))
    print("(ratio = mmdet time / path time: above 1 is faster than mmdet)")
    speeds = bound["single_conv"]["gflop_per_s"]
    shape = "x".join(str(side) for side in bound["single_conv"]["shape"][-2:])
    print(f"convolutions: {bound['conv_gflop']:.1f} GFLOP per image; at batch {per_image['batch']} "
          + ", ".join(f"{n} {v:.0f}" for n, v in bound["effective_gflop_per_s"].items()) + " GFLOP/s")
    print(f"one 3x3 256->256 convolution at {shape}: mmdet (torch) {speeds['mmdet']:.0f} GFLOP/s, "
          f"ONNX Runtime {speeds['onnxruntime']:.0f} GFLOP/s; every convolution at that speed and nothing "
          f"else: ONNX Runtime {bound['onnxruntime_floor_s']:.3f} s, "
          f"{bound['onnxruntime_best_ratio_to_mmdet']:.2f}x mmdet")
    print(f"load average before {load_before}, after {report['load_average_after']}")
    print(f"wrote {write_json(args.out, report, indent=2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
