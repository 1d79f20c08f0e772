"""``python -m paddle_impl.predict``: results json, drawings, metrics, and its errors.

The weights are a fresh model's with the classification bias set to zero, so
every anchor scores sigmoid(0) = 0.5 before the network's own contribution and
detections exist (a fresh detector's prior bias keeps every score below
score_thr 0.05). The predict stage's failure case is here too: a perturbed
Paddle weight must make it fail.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import paddle
import pytest
from PIL import Image

from paddle_impl.data.coco_classes import COCO_CATEGORY_IDS
from paddle_impl.predict import main as predict_main
from tests.seeded_detector import save_seeded_weights
from paddle_impl.data.tiny_coco import generate

# Whole stages, processes or the full-size model: `make test-fast` skips these.
pytestmark = pytest.mark.slow

SCALE = "320x192"


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("coco") / "tiny", train=1, val=3, seed=0)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_seeded_weights(tmp_path_factory.mktemp("weights"))


def val_images(coco: Path) -> list[Path]:
    return sorted((coco / "val2017").glob("*.png"))


def test_results_json_and_drawings(coco, weights, tmp_path, capsys):
    images = val_images(coco)[:2]
    out = tmp_path / "results.json"
    status = predict_main(["--weights", str(weights), "--images", *map(str, images), "--out", str(out),
                           "--draw-dir", str(tmp_path / "draw"), "--draw-thr", "0.4", "--scale", SCALE])
    assert status == 0, capsys.readouterr().err
    records = json.loads(out.read_text())
    assert records, "the zero-bias weights give detections"
    assert {r["image_id"] for r in records} <= {1, 2}
    per_image = {i: sum(r["image_id"] == i for r in records) for i in (1, 2)}
    assert all(0 < n <= 100 for n in per_image.values()), per_image
    for r in records:
        assert r["category_id"] in COCO_CATEGORY_IDS
        assert 0.05 < r["score"] <= 1.0
        x, y, w, h = r["bbox"]
        assert w >= 0 and h >= 0 and np.isfinite([x, y, w, h]).all()
    for image in images:
        drawn = tmp_path / "draw" / f"{image.stem}.png"
        assert drawn.is_file()
        with Image.open(image) as src, Image.open(drawn) as dst:
            assert dst.size == src.size
            assert np.asarray(dst.convert("RGB")).tobytes() != np.asarray(src.convert("RGB")).tobytes()


def test_with_annotation_file_uses_its_ids_and_evaluates(coco, weights, tmp_path, monkeypatch):
    out = tmp_path / "val.json"
    status = predict_main(["--weights", str(weights), "--ann-file",
                           str(coco / "annotations" / "instances_val2017.json"),
                           "--img-prefix", str(coco / "val2017"), "--out", str(out), "--scale", SCALE])
    assert status == 0
    ann = json.loads((coco / "annotations" / "instances_val2017.json").read_text())
    assert {r["image_id"] for r in json.loads(out.read_text())} <= {im["id"] for im in ann["images"]}
    metrics = json.loads((tmp_path / "val.metrics.json").read_text())
    assert len(metrics) == 12 and all(-1.0 <= v <= 1.0 for v in metrics.values())
    # The other backend: the same numbers.
    import paddle_impl.predict as predict

    seen = []
    real = predict.evaluate_bbox
    monkeypatch.setattr(predict, "evaluate_bbox",
                        lambda *a, backend, **k: seen.append(backend) or real(*a, backend=backend, **k))
    status = predict_main(["--weights", str(weights), "--ann-file",
                           str(coco / "annotations" / "instances_val2017.json"), "--img-prefix", str(coco / "val2017"),
                           "--out", str(tmp_path / "fast.json"), "--scale", SCALE,
                           "--eval-backend", "faster-coco-eval"])
    assert status == 0
    assert seen == ["faster-coco-eval"]
    assert json.loads((tmp_path / "fast.metrics.json").read_text()) == metrics


def test_unknown_eval_backend_fails_first(tmp_path, capsys):
    out = tmp_path / "results.json"
    status = predict_main(["--weights", str(tmp_path / "none.pdparams"), "--images", str(tmp_path / "none.png"),
                           "--out", str(out), "--eval-backend", "cocoapi"])
    assert status == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--eval-backend" in err and "'cocoapi'" in err
    assert not out.exists()


def test_missing_image_fails_without_output(coco, weights, tmp_path, capsys):
    out = tmp_path / "results.json"
    missing = tmp_path / "nowhere.png"
    status = predict_main(["--weights", str(weights), "--images", str(val_images(coco)[0]), str(missing),
                           "--out", str(out)])
    assert status == 2
    assert str(missing) in capsys.readouterr().err
    assert not out.exists()


def test_unreadable_image_names_the_file(coco, weights, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    out = tmp_path / "results.json"
    status = predict_main(["--weights", str(weights), "--images", str(broken), "--out", str(out)])
    assert status == 2
    assert "broken.png" in capsys.readouterr().err
    assert not out.exists()


def test_weights_that_do_not_fit_name_the_key(coco, weights, tmp_path, capsys):
    state = paddle.load(str(weights))
    state["bbox_head.retina_cls.weight"] = state["bbox_head.retina_cls.weight"][:9]
    del state["neck.fpn_convs.0.conv.bias"]
    bad = tmp_path / "bad.pdparams"
    paddle.save(state, str(bad))
    out = tmp_path / "results.json"
    status = predict_main(["--weights", str(bad), "--images", str(val_images(coco)[0]), "--out", str(out)])
    assert status == 2
    err = capsys.readouterr().err
    assert "neck.fpn_convs.0.conv.bias" in err and "bbox_head.retina_cls.weight" in err
    assert not out.exists()


def test_predict_stage_fails_on_a_perturbed_weight(tmp_path, monkeypatch):
    import align.predict.stage as stage
    from align.ghm.pair import build_paddle_model

    def perturbed(ckpts, *args, **kwargs):
        model = build_paddle_model(ckpts, *args, **kwargs)
        weight = model.bbox_head.retina_reg.weight
        paddle.assign(weight * 1.01, output=weight)
        return model

    monkeypatch.setattr(stage, "build_paddle_model", perturbed)
    result = stage.run_predict(stage.PredictOptions(scale=(320, 192), reports=tmp_path,
                                                    build_dir=tmp_path / "build"))
    assert not result.passed
    failing = [t.name for t in result.tensors if not t.passed]
    assert any("bbox" in name for name in failing), failing[:10]
    assert json.loads((tmp_path / "predict.json").read_text())["passed"] is False
