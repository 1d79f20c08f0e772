"""The exported network run by an inference engine: Paddle Inference or ONNX Runtime.

Both take a normalised, padded batch ``(N, 3, H, W)`` float32 (any N, any H and
W that are multiples of 32) with its ``img_shape`` and ``inv_scale_factor``
``(N, 2)``, and return the program's outputs as numpy arrays in its output
order: the head's raw maps, then the detections (see
:mod:`paddle_impl.deploy.model_dir`; :func:`paddle_impl.deploy.network.unpack`
splits them).
"""
from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from paddle_impl.deploy.model_dir import INPUT_NAMES, ModelDir

BACKENDS = ("paddle-inference", "onnxruntime")
DEVICES = ("cpu", "gpu")


class Engine(Protocol):
    name: str

    def run(self, images: np.ndarray, img_shape: np.ndarray, inv_scale_factor: np.ndarray) -> list[np.ndarray]:
        """The program's outputs for ``images`` ``(N, 3, H, W)`` float32."""


class PaddleInferenceEngine:
    """Paddle Inference on the exported ``.json`` + ``.pdiparams``.

    On the CPU oneDNN is on unless ``onednn=False`` (Paddle's own default is
    on); ``threads`` sets its math library threads (default: all cores the
    process may use). On ``gpu`` it runs on device 0 with a 512 MB initial pool.
    """

    name = "paddle-inference"

    def __init__(self, model: ModelDir, device: str = "cpu", onednn: bool = True, threads: int | None = None):
        from paddle import inference

        config = inference.Config(str(model.program), str(model.params))
        if device == "gpu":
            config.enable_use_gpu(512, 0)
        else:
            config.disable_gpu()
            if onednn:
                config.enable_mkldnn()
            else:
                config.disable_mkldnn()
            config.set_cpu_math_library_num_threads(threads or len(os.sched_getaffinity(0)))
        config.disable_glog_info()
        self.predictor = inference.create_predictor(config)
        self.device = device
        self.onednn = onednn and device == "cpu"

    def run(self, images: np.ndarray, img_shape: np.ndarray, inv_scale_factor: np.ndarray) -> list[np.ndarray]:
        for name, value in zip(INPUT_NAMES, (images, img_shape, inv_scale_factor)):
            handle = self.predictor.get_input_handle(name)
            handle.reshape(list(value.shape))
            handle.copy_from_cpu(np.ascontiguousarray(value, dtype=np.float32))
        self.predictor.run()
        return [self.predictor.get_output_handle(n).copy_to_cpu() for n in self.predictor.get_output_names()]


class OnnxRuntimeEngine:
    """ONNX Runtime on the exported ``.onnx``: the CPU provider, or CUDA's first on ``gpu``
    (with the onnxruntime-gpu package in place of onnxruntime).

    paddle2onnx converts the program's NMS for a batch of one, so a batch runs
    image by image and the outputs are joined as the Paddle program gives them.
    """

    name = "onnxruntime"

    def __init__(self, model: ModelDir, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if device == "gpu":
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(model.onnx), options, providers=providers)
        self.device = device

    def run(self, images: np.ndarray, img_shape: np.ndarray, inv_scale_factor: np.ndarray) -> list[np.ndarray]:
        runs = [self.session.run(None, {name: np.ascontiguousarray(value[i:i + 1], dtype=np.float32)
                                        for name, value in zip(INPUT_NAMES, (images, img_shape, inv_scale_factor))})
                for i in range(len(images))]
        return [np.concatenate(parts) for parts in zip(*runs)]


def open_engine(backend: str, model: ModelDir, device: str = "cpu", onednn: bool = True,
                threads: int | None = None) -> Engine:
    """The engine of ``backend`` on ``model`` (its files checked first)."""
    model.spec()
    model.require(backend)
    if backend == "paddle-inference":
        return PaddleInferenceEngine(model, device, onednn=onednn, threads=threads)
    return OnnxRuntimeEngine(model, device, threads=threads)
