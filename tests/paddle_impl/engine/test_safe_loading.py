"""No file a user hands in runs code: pickle payloads through every entry point.

Each planted file carries a ``__reduce__`` payload that would create a marker
file when unpickled by ``pickle.load`` or ``paddle.load``. Every entry point
that reads a user's weights must refuse it with exit status 2 and one line
naming the file and what was refused, and the marker must never appear.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
import torch

from paddle_impl.engine import checkpoint as ckpt
from paddle_impl.engine import safe_load
from paddle_impl.predict import main as predict_main
from paddle_impl.data.tiny_coco import generate
from paddle_impl.train import main as train_main

from tests.paths import ROOT  # noqa: E402
COMMON = ["--scale", "128x96", "--num-workers", "0", "--no-progress", "--seed", "0"]


class Payload:
    """Unpickling this object runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PAYLOAD_RAN"
    # The payload is real: plain pickle runs it.
    pickle.loads(pickle.dumps(Payload(path)))
    assert path.exists()
    path.unlink()
    return path


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("data") / "coco", train=4, val=2, seed=0, size=(128, 192))


def pdparams_with_payload(path: Path, marker: Path) -> Path:
    state = {"backbone.conv1.weight": np.zeros((64, 3, 7, 7), np.float32), "extra": Payload(marker)}
    with open(path, "wb") as f:
        pickle.dump(state, f, protocol=4)
    return path


def ckpt_with_payload(path: Path, marker: Path) -> Path:
    state = {key: 0 for key in ckpt.REQUIRED_KEYS}
    state.update(format=ckpt.FORMAT, model={"w": np.zeros(3, np.float32)}, run=Payload(marker))
    with open(path, "wb") as f:
        pickle.dump(state, f, protocol=4)
    return path


def pth_with_payload(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "meta": {"x": Payload(marker)}}, path)
    return path


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert lines and lines[-1].startswith("error: "), stderr[-2000:]
    return lines[-1]


def test_restricted_unpickler_refuses_globals_and_reads_state_dicts(tmp_path, marker):
    planted = pdparams_with_payload(tmp_path / "evil.pdparams", marker)
    with pytest.raises(safe_load.UnsafeFileError, match=r"evil\.pdparams: refused to unpickle posix\.system"):
        safe_load.load(planted)
    assert not marker.exists()

    # What paddle.save writes for a state dict loads as numpy arrays, bit for bit.
    layer = paddle.nn.Conv2D(3, 4, 3)
    paddle.save(layer.state_dict(), str(tmp_path / "ok.pdparams"))
    loaded = safe_load.load(tmp_path / "ok.pdparams")
    assert set(loaded) == set(layer.state_dict())
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(loaded[key], value.numpy())

    # Numpy scalars, dtypes, object arrays of safe items and every pickle protocol load.
    tree = {"a": np.float32(1.5), "b": np.dtype("int64"), "c": np.array([1, "x"], dtype=object),
            "d": [np.arange(3)], "e": np.random.get_state()}
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        back = safe_load.loads(pickle.dumps(tree, protocol=protocol))
        assert back["a"] == tree["a"] and back["b"] == tree["b"]
        np.testing.assert_array_equal(back["e"][1], tree["e"][1])

    # A payload inside an object array is refused too.
    sneaky = np.array([Payload(marker)], dtype=object)
    with pytest.raises(safe_load.UnsafeFileError):
        safe_load.loads(pickle.dumps(sneaky))
    assert not marker.exists()

    # Truncated and foreign files are unreadable, not unsafe.
    data = (tmp_path / "ok.pdparams").read_bytes()
    with pytest.raises(safe_load.UnreadableFileError, match="truncated"):
        safe_load.loads(data[: len(data) // 2], "half.pdparams")
    with pytest.raises(safe_load.UnreadableFileError, match="nowhere.pdparams: file not found"):
        safe_load.load(tmp_path / "nowhere.pdparams")


def test_nested_rng_state_payload_is_refused(marker):
    """The checkpoint's Paddle generator state is a pickle inside the pickle; it is read safely too."""
    state = ckpt.rng_state()
    ckpt.set_rng_state(state)  # the real one restores
    first = paddle.rand([3]).numpy()
    ckpt.set_rng_state(state)
    np.testing.assert_array_equal(paddle.rand([3]).numpy(), first)
    with pytest.raises(safe_load.UnsafeFileError, match="posix.system"):
        ckpt.set_rng_state(dict(state, paddle=pickle.dumps(Payload(marker))))
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("flag, kind", [("--init", "pdparams"), ("--init-backbone", "pdparams"),
                                        ("--init", "ckpt"), ("--resume", "ckpt"), ("--init", "pth")])
def test_train_refuses_payloads(coco, tmp_path, marker, capsys, flag, kind):
    make = {"pdparams": pdparams_with_payload, "ckpt": ckpt_with_payload, "pth": pth_with_payload}[kind]
    planted = make(tmp_path / f"evil.{kind}", marker)
    code = train_main(["--coco", str(coco), "--work-dir", str(tmp_path / "work"), *COMMON,
                       "--max-iters", "1", flag, str(planted)])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert "evil." + kind in line and "posix.system" in line, line
    assert not marker.exists()
    assert not (tmp_path / "work" / "latest.ckpt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pdparams", "ckpt"])
def test_predict_refuses_payloads(coco, tmp_path, marker, capsys, kind):
    make = pdparams_with_payload if kind == "pdparams" else ckpt_with_payload
    planted = make(tmp_path / f"evil.{kind}", marker)
    image = next((coco / "val2017").iterdir())
    code = predict_main(["--weights", str(planted), "--images", str(image), "--out", str(tmp_path / "r.json")])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and f"evil.{kind}" in line and "posix.system" in line, line
    assert not marker.exists() and not (tmp_path / "r.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "weights_convert", "mmdet-to-paddle"],
    [sys.executable, "-m", "weights_convert", "torchvision-resnet50"],
    [sys.executable, "-m", "align.forward", "--ckpt"],
])
def test_converter_and_stages_refuse_pth_payloads(tmp_path, marker, command):
    planted = pth_with_payload(tmp_path / "evil.pth", marker)
    out = tmp_path / "out.pdparams"
    args = [*command, str(planted)]
    args += [str(out)] if "weights_convert" in command else ["--reports", str(tmp_path / "reports"),
                                                             "--build-dir", str(tmp_path / "build")]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_error_line(proc.stderr)
    assert "evil.pth" in line and "posix.system" in line, line
    assert "weights_only" in line
    assert not marker.exists()
    assert not out.exists() and not (tmp_path / "reports" / "forward.json").exists()
