"""Export and inference: the exported network and post-processing on Paddle Inference (oneDNN on)
and ONNX Runtime against the dynamic graph, the detections of ``python -m paddle_impl.infer`` against
``python -m paddle_impl.predict``, a perturbed exported weight caught, and bad input refused.

One export (about 15 s) serves every test; the inputs are small.
The weights are a fresh model's with the classification bias set to zero, so
detections exist (as in tests/paddle_impl/test_predict_cli.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import paddle
import pytest

from align.deploy.tipc import same_detections
from align.predict.stage import BOX_ATOL, SCORE_ATOL, pair_order
from paddle_impl.boxes.postprocess import Detections, image_tensors, predict_boxes
from paddle_impl.data.tiny_coco import generate
from paddle_impl.deploy.backends import open_engine
from paddle_impl.deploy.model_dir import ModelDir, output_names
from paddle_impl.deploy.network import unpack
from paddle_impl.export import export, load_detector
from paddle_impl.infer import main as infer_main
from paddle_impl.model.detector import RetinaNet
from paddle_impl.predict import main as predict_main
from tests.seeded_detector import save_seeded_weights

# The full-size detector: `make test-fast` skips these.
pytestmark = pytest.mark.slow

RTOL = 1e-5


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_seeded_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def exported(weights, tmp_path_factory) -> ModelDir:
    return export(str(weights), tmp_path_factory.mktemp("export") / "model", scale=(320, 192))


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("coco") / "tiny", train=1, val=2, seed=0)


def metas_of(images: np.ndarray) -> list[dict]:
    """Each image resized to a little less than the batch, from a picture of another size."""
    height, width = images.shape[-2:]
    return [{"img_shape": (height - 3 * i, width - 5 * i), "scale_factor": (0.75 + 0.5 * i, 0.8 + 0.25 * i)}
            for i in range(len(images))]


def dynamic_outputs(model: RetinaNet, images: np.ndarray) -> tuple[list[np.ndarray], list[Detections]]:
    with paddle.no_grad():
        cls_scores, bbox_preds = model(paddle.to_tensor(images))
    return [t.numpy() for t in cls_scores + bbox_preds], predict_boxes(cls_scores, bbox_preds, metas_of(images))


def engine_outputs(engine, images: np.ndarray) -> tuple[list[np.ndarray], list[Detections]]:
    img_shape, inv_scale_factor = image_tensors(metas_of(images))
    return unpack(engine.run(images, img_shape.numpy(), inv_scale_factor.numpy()))


def assert_same_detections(got: list[Detections], want: list[Detections]) -> None:
    """Per image the same count and, paired as the predict stage pairs them (scores a few ulps
    apart may swap places), the same labels, boxes within 1e-3 px and scores within 1e-5."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g, w = ({field: getattr(d, field).numpy() for field in Detections._fields} for d in (g, w))
        assert len(g["scores"]) == len(w["scores"])
        order, _ = pair_order(w, g, box_atol=BOX_ATOL, score_atol=SCORE_ATOL)
        np.testing.assert_array_equal(g["labels"][order], w["labels"])
        np.testing.assert_allclose(g["bboxes"][order], w["bboxes"], rtol=0, atol=BOX_ATOL)
        np.testing.assert_allclose(g["scores"][order], w["scores"], rtol=0, atol=SCORE_ATOL)


def worst_relative(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    assert [g.shape for g in got] == [w.shape for w in want]
    return max(float(np.abs(g - w).max() / np.abs(w).max()) for g, w in zip(got, want))


def test_export_folder_describes_the_model(exported, weights):
    for path in (exported.program, exported.params, exported.onnx, exported.spec_path):
        assert path.is_file(), path
    spec = exported.spec()
    assert spec["outputs"] == output_names() + ["bboxes", "scores", "labels", "num"]
    assert [i["name"] for i in spec["inputs"]] == ["images", "img_shape", "inv_scale_factor"]
    assert spec["postprocess"]["in_program"]
    assert spec["preprocess"]["resize"]["scale_wh"] == [320, 192]
    assert spec["preprocess"]["mean_rgb"] == [123.675, 116.28, 103.53]
    assert spec["preprocess"]["pad_size_divisor"] == 32
    assert spec["postprocess"]["test_cfg"]["max_per_img"] == 100
    assert len(spec["weights"]["sha256"]) == 64
    # No leftover build folders beside the export.
    assert [p.name for p in exported.root.parent.iterdir()] == ["model"]


@pytest.mark.parametrize("backend", ["paddle-inference", "onnxruntime"])
def test_each_engine_equals_the_dynamic_graph_at_free_batch_and_size(exported, weights, backend):
    model = load_detector(str(weights))
    engine = open_engine(backend, exported, threads=2)
    rng = np.random.default_rng(0)
    for shape in [(1, 3, 64, 96), (2, 3, 96, 64), (3, 3, 128, 160)]:
        images = rng.standard_normal(shape).astype(np.float32)
        raw, detections = engine_outputs(engine, images)
        want_raw, want_detections = dynamic_outputs(model, images)
        assert worst_relative(raw, want_raw) <= RTOL, (backend, shape)
        assert all(len(d.scores) > 0 for d in want_detections), shape
        assert_same_detections(detections, want_detections)


def test_a_perturbed_exported_weight_is_caught(weights, tmp_path):
    model = load_detector(str(weights))
    images = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    want, _ = dynamic_outputs(model, images)
    conv = model.neck.fpn_convs[0].conv.weight
    paddle.assign(conv * (1 + 1e-3), output=conv)
    target = export(str(weights), tmp_path / "perturbed", model=model, onnx=False)
    got, _ = engine_outputs(open_engine("paddle-inference", target, threads=2), images)
    assert worst_relative(got, want) > 10 * RTOL


@pytest.mark.parametrize("backend", ["paddle-inference", "onnxruntime"])
def test_infer_gives_the_detections_of_predict(exported, weights, coco, backend, tmp_path, capsys):
    images = [str(p) for p in sorted((coco / "val2017").glob("*.png"))]
    out = tmp_path / "infer"
    assert infer_main(["--model", str(exported.root), "--images", *images, "--backend", backend,
                       "--threads", "2", "--out", str(out)]) == 0, capsys.readouterr().err
    assert predict_main(["--weights", str(weights), "--images", *images, "--scale", "320x192",
                         "--out", str(tmp_path / "predict.json")]) == 0
    got = json.loads((out / "detections.json").read_text())
    want = json.loads((tmp_path / "predict.json").read_text())
    assert got and len(got) == len(want)
    assert [g["image_id"] for g in got] == [w["image_id"] for w in want]
    assert same_detections(want, got)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(Path(p).stem + ".png" for p in images)


@pytest.mark.parametrize("args, message", [
    (["--model", "{missing}"], "folder not found"),
    (["--model", "{empty}"], "no deploy.json"),
    (["--model", "{model}", "--backend", "tensorrt"], "--backend tensorrt: not one of"),
    (["--model", "{model}", "--device", "npu"], "--device npu: not one of"),
] + ([] if paddle.is_compiled_with_cuda() else [
    (["--model", "{model}", "--device", "gpu"], "--device gpu: this paddlepaddle has no CUDA"),
]))
def test_bad_model_or_backend_is_one_line_and_writes_nothing(exported, coco, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    names = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "model": exported.root}
    args = [a.format(**names) for a in args]
    image = str(sorted((coco / "val2017").glob("*.png"))[0])
    status = infer_main([*args, "--images", image, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_folder_that_is_not_an_export(weights, tmp_path, capsys):
    from paddle_impl.export import main as export_main

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert export_main(["--weights", str(weights), "--out", str(tmp_path / "busy")]) == 2
    assert "not an earlier export" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
