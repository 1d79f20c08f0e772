"""Isolated layers, weight carrying and ``align.pair`` on small modules and on the ResNet-18 example."""
from __future__ import annotations

import json

import numpy as np
import paddle
import pytest
import torch

from align.engine.capture import PaddleComparer, TorchRecorder
from align.engine.isolate import TorchCallRecorder, isolated_backward, isolated_forward, spill_store
from align.engine.weights import NameMap, carry_weights, plan_conversion
from align.pair.__main__ import main as pair_main
from align.pair.run import align_pair
from tests.align.faults import WrongBackwardReLU


class TorchBlock(torch.nn.Module):
    """conv-BN-ReLU twice with a residual add, a reused ReLU, a pool and a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.relu = torch.nn.ReLU(inplace=True)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(torch.flatten(self.pool(y), 1))


class PaddleBlock(paddle.nn.Layer):
    def __init__(self, relu=None):
        super().__init__()
        self.conv1 = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.bn1 = paddle.nn.BatchNorm2D(8)
        self.conv2 = paddle.nn.Conv2D(8, 8, 3, padding=1, bias_attr=False)
        self.bn2 = paddle.nn.BatchNorm2D(8)
        self.relu = relu or paddle.nn.ReLU()
        self.pool = paddle.nn.AdaptiveAvgPool2D(1)
        self.fc = paddle.nn.Linear(8, 5)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(paddle.flatten(self.pool(y), 1))


def pair(relu=None):
    torch.manual_seed(0)
    paddle.seed(0)
    t, p = TorchBlock(), PaddleBlock(relu)
    with torch.no_grad():  # non-trivial BN statistics
        for bn in (t.bn1, t.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    carry_weights(t, p, NameMap())
    return t.eval(), p.eval()


INPUT = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)


def record(t, grads=False, spill=False):
    with spill_store(spill) as store:
        with TorchCallRecorder(t, store, grads=grads) as recorder:
            if grads:
                out = t(torch.from_numpy(INPUT))
                (out * torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
            else:
                with torch.no_grad():
                    t(torch.from_numpy(INPUT))
        yield recorder.calls, store


def test_weights_map_strictly_and_transpose_linear():
    t, p = pair()
    conversions, dropped = plan_conversion(t, p, NameMap())
    assert {c.paddle_key for c in conversions if c.transpose} == {"fc.weight"}
    assert "bn1._mean" in {c.paddle_key for c in conversions} and "bn1.num_batches_tracked" in dropped
    np.testing.assert_array_equal(p.fc.weight.numpy(), t.fc.weight.detach().numpy().T)
    np.testing.assert_array_equal(p.bn2._variance.numpy(), t.bn2.running_var.numpy())
    with pytest.raises(KeyError, match="torch fc.weight -> paddle head.weight: no such Paddle key"):
        plan_conversion(t, p, NameMap([("fc", "head")]))
    other = PaddleBlock()
    other.fc = paddle.nn.Linear(8, 6)
    with pytest.raises(KeyError, match="fc.weight .* shapes differ"):
        plan_conversion(t, other, NameMap())
    # A Paddle parameter no torch tensor fills is named too.
    extra = PaddleBlock()
    extra.head = paddle.nn.Linear(5, 2)
    with pytest.raises(KeyError, match=r"paddle keys no torch key fills: \['head.weight', 'head.bias'\]"):
        plan_conversion(t, extra, NameMap())


def test_name_map_from_json(tmp_path):
    good = tmp_path / "map.json"
    good.write_text(json.dumps({"prefixes": [["backbone.", ""], ["pool", "avgpool"]]}))
    m = NameMap.from_json(good)
    assert m.tensor("backbone.layer1.0.bn1.running_var") == "layer1.0.bn1._variance"
    assert m.tensor("pool.weight") == "avgpool.weight" and m.tensor("x.num_batches_tracked") is None
    bad = tmp_path / "bad.json"
    bad.write_text('{"prefixes": [["a"]]}')
    with pytest.raises(ValueError, match="bad.json: expected"):
        NameMap.from_json(bad)


@pytest.mark.parametrize("spill", [False, True])
def test_isolated_forward_own_errors(spill):
    t, p = pair()
    for calls, store in record(t, spill=spill):
        rows = isolated_forward(calls, store, p, NameMap())
    names = [r.name for r in rows]
    # The reused ReLU is compared per call; every leaf layer is there, in execution order.
    assert names == ["conv1", "bn1", "relu", "conv2", "bn2", "relu#1", "pool", "fc"]
    assert all(r.passed for r in rows)
    by_name = {r.name: r for r in rows}
    # ReLU and pooling of the same float32 input are exact; conv and BN are float32 rounding.
    assert by_name["relu"].max_abs == 0 and by_name["relu#1"].max_abs == 0
    assert by_name["conv1"].rel_max < 1e-6


def test_perturbed_weight_fails_only_its_layer_in_isolation():
    t, p = pair()
    with paddle.no_grad():
        p.conv2.weight.set_value(p.conv2.weight * (1 + 1e-3))
    for calls, store in record(t):
        isolated = isolated_forward(calls, store, p, NameMap())
    assert [r.name for r in isolated if not r.passed] == ["conv2"]
    # The accumulated run fails there and after it.
    with torch.no_grad(), TorchRecorder(t) as rec:
        t(torch.from_numpy(INPUT))
    with paddle.no_grad(), PaddleComparer(p, rec.records) as cmp:
        p(paddle.to_tensor(INPUT))
    failed = [r.name for r in cmp.rows if not r.passed]
    assert failed[0] == "conv2" and len(failed) > 1


def test_isolated_backward_names_a_wrong_backward():
    t, p = pair()
    for calls, store in record(t, grads=True):
        good = isolated_backward(calls, store, t, p, NameMap())
    assert good and all(r.passed for r in good), [(r.name, r.reason) for r in good if not r.passed]
    names = {r.name for r in good}
    assert {"conv1.weight.grad", "conv1.bias.grad", "bn1.weight.grad", "fc.weight.grad", "relu#1.input_grad"} <= names

    t, p = pair(relu=WrongBackwardReLU())
    for calls, store in record(t, grads=True):
        forward = isolated_forward(calls, store, p, NameMap())
        bad = isolated_backward(calls, store, t, p, NameMap())
    assert all(r.passed for r in forward)
    assert {r.name for r in bad if not r.passed} == {"relu.input_grad", "relu#1.input_grad"}


def test_example_pair_passes_and_names_a_perturbation(tmp_path):
    from align.examples.resnet18 import NAME_MAP, build_paddle, build_torch

    images = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    result = align_pair(build_torch(), build_paddle(), images, name_map=NameMap.from_json(NAME_MAP),
                        isolate=True, backward=True, reports=tmp_path, stage="example")
    assert result.passed, [(r.name, r.reason) for r in result.layers if not r.passed][:5]
    assert result.meta["carried_tensors"] == 102
    assert {row.kind for row in result.extra_tables[-2].rows} >= {"conv", "BN", "ReLU", "pool", "linear"}
    assert (tmp_path / "example.html").is_file()

    status = pair_main(["--torch", "align.examples.resnet18:build_torch",
                        "--paddle", "align.examples.resnet18:build_paddle", "--map", str(NAME_MAP),
                        "--shape", "1x3x32x32", "--isolate", "--perturb", "layer3.0.conv2.weight",
                        "--reports", str(tmp_path), "--name", "perturbed"])
    assert status == 1
    document = json.loads((tmp_path / "perturbed.json").read_text())
    assert document["first_divergence"] == "layer3.0.conv2"
    assert [r["name"] for r in document["layers"] if not r["passed"]] == ["layer3.0.conv2"]


def test_pair_command_rejects_bad_input(tmp_path, capsys):
    assert pair_main(["--torch", "nowhere", "--paddle", "x:y", "--reports", str(tmp_path)]) == 2
    assert "--torch 'nowhere': expected module:function" in capsys.readouterr().err
    assert pair_main(["--torch", "align.examples.resnet18:nothing", "--paddle", "x:y",
                      "--reports", str(tmp_path)]) == 2
    assert "has no function nothing" in capsys.readouterr().err


def test_a_long_sum_passes_only_within_the_references_own_rounding():
    from align.engine.compare import diff_arrays
    from align.engine.isolate import within_reference_rounding

    exact = np.array([1.0, -1.0, 1e-3])
    reference = (exact + np.array([0, 0, 2e-7])).astype(np.float32)  # torch's float32 sum
    close = (exact + np.array([0, 0, -3e-7])).astype(np.float32)  # paddle's, another order
    far = (exact + np.array([0, 0, 5e-5])).astype(np.float32)  # paddle's, wrong
    row = diff_arrays("w.grad", reference, close, rel_tol=1e-7, mean_tol=1e-7)
    assert not row.passed
    kept = within_reference_rounding(row, reference, exact, close)
    assert kept.passed and "within the reference's own float32 rounding" in kept.reason
    wrong = diff_arrays("w.grad", reference, far, rel_tol=1e-7, mean_tol=1e-7)
    assert not within_reference_rounding(wrong, reference, exact, far).passed
    nan = diff_arrays("w.grad", reference, np.full(3, np.nan, np.float32))
    assert not within_reference_rounding(nan, reference, exact, np.full(3, np.nan, np.float32)).passed
