"""Export the GHM RetinaNet for deployment: Paddle's inference format and ONNX, with its preprocessing.

Usage::

    python -m paddle_impl.export --weights W --out DIR [--scale WxH] [--no-onnx]

``--weights``: as ``python -m paddle_impl.predict`` takes them (``.pdparams``,
a training checkpoint ``.ckpt``, or an mmdet ``.pth``, converted by
``python -m weights_convert``). ``make export`` defaults to the seeded
checkpoint the alignment stages use.

``DIR`` gets ``model.json`` + ``model.pdiparams`` (``paddle.jit.save`` of the
network and its post-processing, :mod:`paddle_impl.deploy.network`, with the
batch size, H and W free), ``model.onnx`` (paddle2onnx, opset from
``get_config()['deploy']``) and ``deploy.json`` (the preprocessing, the inputs
and outputs, the test_cfg, provenance; see :mod:`paddle_impl.deploy.model_dir`). The folder is built beside ``DIR`` and
moved into place when complete: an interrupted export leaves the previous one.
A ``DIR`` that exists and is not an earlier export is refused.
Exit status 0, or 2 on bad input.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

os.environ.setdefault("GLOG_minloglevel", "2")

import paddle  # noqa: E402

from common.arguments import parse_size  # noqa: E402
from common.atomic_write import write_json  # noqa: E402
from common.digest import sha256_of  # noqa: E402
from common.errors import InputError  # noqa: E402
from paddle_impl.config import get_config  # noqa: E402
from paddle_impl.deploy.model_dir import (  # noqa: E402
    DETECTION_NAMES, SPEC_VERSION, ModelDir, output_names, preprocessing_spec)
from paddle_impl.deploy.network import DeployedRetinaNet, input_specs  # noqa: E402
from paddle_impl.engine.weights import convert_torch_checkpoint, load_weights, load_weights_file  # noqa: E402
from paddle_impl.errors import run_command  # noqa: E402
from paddle_impl.model.detector import RetinaNet  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m paddle_impl.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help=".pdparams, training checkpoint .ckpt, or mmdet .pth")
    p.add_argument("--out", required=True, help="export folder to write (replaced when it holds an earlier export)")
    p.add_argument("--scale", type=parse_size, help="test resize bound WxH recorded with the model (default 1333x800)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX conversion")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="with an error, also print its Python traceback (or set GHM_TRACEBACK=1)")
    return p.parse_args(argv)


def load_detector(weights: str, flag: str = "--weights") -> RetinaNet:
    """Our detector with ``weights`` loaded strictly (an mmdet ``.pth`` converted first), eval mode."""
    if not Path(weights).is_file():
        raise InputError(f"{flag} {weights}: file not found")
    model = RetinaNet.from_config()
    with tempfile.TemporaryDirectory(prefix="ghm-weights-") as tmp:
        path = convert_torch_checkpoint(weights, flag, tmp)
        load_weights(model, load_weights_file(path, flag), f"{flag} {weights}")
    model.eval()
    return model


def save_static(model: RetinaNet, target: ModelDir) -> None:
    """``model``'s network and post-processing as a static program (:mod:`paddle_impl.deploy.network`)."""
    static = paddle.jit.to_static(DeployedRetinaNet(model), input_spec=input_specs(), full_graph=True)
    paddle.jit.save(static, str(target.prefix))


def to_onnx(target: ModelDir) -> None:
    """``model.onnx`` from the saved program by paddle2onnx."""
    import paddle2onnx

    opset = get_config()["deploy"]["opset_version"]
    # paddle2onnx's C++ side reports its progress on the process's stdout; the export's own
    # lines say what was written, so its file descriptor 1 is pointed at /dev/null meanwhile.
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as sink:
            os.dup2(sink.fileno(), 1)
            paddle2onnx.export(str(target.program), str(target.params), str(target.onnx), opset_version=opset,
                               enable_onnx_checker=True)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    if not target.onnx.is_file():
        raise RuntimeError(f"paddle2onnx wrote no {target.onnx}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not ModelDir(out).spec_path.is_file():
        raise InputError(f"--out {out}: a folder that is not an earlier export; give a new or empty folder")


def _move_into_place(built: Path, out: Path) -> None:
    """Replace ``out`` by the complete ``built`` folder; the old export goes only after the new is in."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / out.name)
    os.replace(built, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export(weights: str, out: str | os.PathLike, scale: tuple[int, int] | None = None, onnx: bool = True,
           model: RetinaNet | None = None) -> ModelDir:
    """Write the export folder ``out`` (see the module docstring); returns it.

    ``model``: an already loaded detector to export instead of loading ``weights``
    (which is then only recorded); the deploy stage exports a perturbed copy this way.
    ``paddle.jit.to_static`` converts the layer it is given in place, so a ``model``
    passed here runs as a static program afterwards: pass a copy that is not used again.
    """
    out = Path(out)
    _check_out(out)
    model = load_detector(weights) if model is None else model
    out.parent.mkdir(parents=True, exist_ok=True)
    built = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    # mkdtemp's folder is private; the export gets the mode a plain mkdir would give it.
    os.chmod(built, 0o777 & ~_umask())
    try:
        target = ModelDir(built)
        t0 = time.perf_counter()
        save_static(model, target)
        seconds = {"paddle_static_s": round(time.perf_counter() - t0, 2)}
        if onnx:
            t0 = time.perf_counter()
            to_onnx(target)
            seconds["onnx_s"] = round(time.perf_counter() - t0, 2)
        import paddle2onnx

        write_json(target.spec_path, {
            "spec_version": SPEC_VERSION,
            "inputs": [{"name": "images", "shape": ["N", 3, "H", "W"], "dtype": "float32"},
                       {"name": "img_shape", "shape": ["N", 2], "dtype": "float32", "value": "(h, w) resized"},
                       {"name": "inv_scale_factor", "shape": ["N", 2], "dtype": "float32",
                        "value": "(1 / w_scale, 1 / h_scale), the reciprocals in float64, then rounded"}],
            "outputs": output_names() + list(DETECTION_NAMES),
            "preprocess": preprocessing_spec(scale),
            "postprocess": {"test_cfg": model.test_cfg, "in_program": True,
                            "code": "paddle_impl.boxes.postprocess.detect"},
            "onnx_batch": "1 per run (paddle2onnx converts the NMS for one image)" if onnx else None,
            "files": {"paddle": [target.program.name, target.params.name],
                      "onnx": target.onnx.name if onnx else None},
            "opset_version": get_config()["deploy"]["opset_version"] if onnx else None,
            "weights": {"path": str(weights), "sha256": sha256_of(weights) if Path(weights).is_file() else None},
            "versions": {"paddlepaddle": paddle.__version__, "paddle2onnx": paddle2onnx.__version__},
            "seconds": seconds,
        }, indent=1)
        _move_into_place(built, out)
    finally:
        shutil.rmtree(built, ignore_errors=True)
    return ModelDir(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def call() -> int:
        target = export(args.weights, args.out, args.scale, onnx=not args.no_onnx)
        files = [target.program, target.params] + ([target.onnx] if not args.no_onnx else []) + [target.spec_path]
        print("exported -> " + ", ".join(str(f) for f in files))
        return 0

    return run_command(call, argv)


if __name__ == "__main__":
    sys.exit(main())
