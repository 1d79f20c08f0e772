"""Tests of the model-agnostic alignment engine (align.engine.compare, align.engine.capture, align.engine.report)."""
from __future__ import annotations

import base64
import json
import math
import re

import numpy as np
import pytest

from align.engine.compare import diff_arrays, first_failure
from align.engine.reprod import echo_reprod_log, reprod_log_diff, reprod_log_passed
from align.engine.environment import environment_info
from common.digest import sha256_of
from align.engine.report import Headline, StageResult, write_index, write_stage_report
from align.ghm.suite import PACKAGES


# ---------------------------------------------------------------- diff_arrays


def test_equal_arrays_pass():
    a = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    row = diff_arrays("x", a, a.copy())
    assert row.passed and row.reason == ""
    assert row.max_abs == 0.0 and row.mean_abs == 0.0 and row.rel_max == 0.0
    assert row.ref_shape == row.test_shape == (2, 3, 4)
    assert row.finite


def test_tiny_difference_passes_and_reports_figures():
    ref = np.full((4, 5), 10.0)
    test = ref + 1e-6
    row = diff_arrays("x", ref, test, rel_tol=1e-5, mean_tol=1e-5)
    assert row.passed
    assert row.max_abs == pytest.approx(1e-6)
    assert row.rel_max == pytest.approx(1e-7)
    assert row.ref_max_abs == 10.0


def test_difference_above_rel_tol_fails():
    ref = np.ones(100)
    test = ref.copy()
    test[7] += 1e-3  # mean diff 1e-5 (within), rel 1e-3 (not)
    row = diff_arrays("x", ref, test, rel_tol=1e-5, mean_tol=1e-4)
    assert not row.passed
    assert row.reason.startswith("rel 1.0e-03 > 1e-05")


def test_mean_above_mean_tol_fails():
    ref = np.full(10, 1e3)
    test = ref + 1e-3  # rel 1e-6 passes, mean 1e-3 does not
    row = diff_arrays("x", ref, test, rel_tol=1e-5, mean_tol=1e-5)
    assert not row.passed
    assert "mean" in row.reason and "rel" not in row.reason


@pytest.mark.parametrize("side", ["reference", "paddle", "both"])
def test_nan_fails_on_either_side(side):
    ref = np.ones(6, dtype=np.float32)
    test = ref.copy()
    if side in ("reference", "both"):
        ref[2] = np.nan
    if side in ("paddle", "both"):
        test[2] = np.nan  # same position on both sides: equal_nan must not hide it
    row = diff_arrays("x", ref, test, rel_tol=1e9, mean_tol=1e9)
    assert not row.passed and not row.finite
    if side == "both":
        assert "NaN in reference" in row.reason and "NaN in paddle" in row.reason
    else:
        assert f"NaN in {side}" in row.reason
    assert row.to_dict()["max_abs"] == "nan"
    json.dumps(row.to_dict(), allow_nan=False)


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_inf_fails(value):
    ref = np.ones(3)
    for a, b, label in ((ref, np.array([1.0, value, 1.0]), "paddle"), (np.array([value, 1.0, 1.0]), ref, "reference")):
        row = diff_arrays("x", a, b, rel_tol=1e9, mean_tol=1e9)
        assert not row.passed and f"Inf in {label}" in row.reason
    both = np.array([value, 1.0, 1.0])
    assert not diff_arrays("x", both, both.copy(), rel_tol=1e9, mean_tol=1e9).passed


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_figures_over_many_blocks_equal_whole_array_reductions(dtype):
    from align.engine.compare import _BLOCK

    rng = np.random.default_rng(3)
    ref = rng.normal(size=3 * _BLOCK + 1).astype(dtype)  # 7 rows, the last block partial
    test = ref + rng.normal(scale=1e-6, size=ref.size).astype(dtype)
    test[2 * _BLOCK + 1] += 1  # the largest difference, in a later block
    ref[-1] = -50  # the largest |reference|, in the last, partial block
    row = diff_arrays("x", ref.reshape(7, -1), test.reshape(7, -1), rel_tol=1.0, mean_tol=1.0)
    diff = np.abs(test - ref)
    assert row.passed and row.finite
    assert row.max_abs == float(diff.max()) and row.ref_max_abs == 50.0
    assert row.mean_abs == pytest.approx(float(diff.mean(dtype=np.float64)), rel=1e-12)


@pytest.mark.parametrize("value, reason", [(np.nan, "NaN in paddle"), (np.inf, "Inf in paddle"),
                                           (-np.inf, "Inf in paddle")])
def test_a_non_finite_value_in_a_late_block_fails(value, reason):
    from align.engine.compare import _BLOCK

    ref = np.ones(2 * _BLOCK + 3, np.float32)
    test = ref.copy()
    test[_BLOCK + 2] = value
    row = diff_arrays("x", ref, test, rel_tol=1e30, mean_tol=1e30)
    assert not row.passed and not row.finite and row.reason == reason


def test_an_overflowing_difference_of_finite_values_fails_as_a_difference():
    big = np.finfo(np.float32).max
    ref = np.array([big, 1.0], np.float32)
    row = diff_arrays("x", ref, np.array([-big, 1.0], np.float32))
    assert row.finite and not row.passed and row.reason.startswith("rel inf")


def test_shape_mismatch_fails_with_shapes_in_reason():
    row = diff_arrays("x", np.zeros((2, 3)), np.zeros((2, 4)))
    assert not row.passed
    assert row.reason == "shape mismatch (2, 3) vs (2, 4)"
    assert math.isnan(row.max_abs)
    # Broadcastable shapes must not be compared by broadcasting.
    assert not diff_arrays("y", np.zeros((1, 3)), np.zeros((3,))).passed


def test_all_zero_reference():
    zeros = np.zeros((3, 3))
    same = diff_arrays("z", zeros, zeros.copy())
    assert same.passed and same.rel_max == 0.0
    off = diff_arrays("z", zeros, zeros + 1e-9, rel_tol=1e-5, mean_tol=1.0)
    assert not off.passed and off.rel_max == math.inf
    assert off.to_dict()["rel_max"] == "inf"


def test_integer_bool_and_scalar_inputs():
    labels = np.array([3, 7, 79, 0], dtype=np.int64)
    assert diff_arrays("labels", labels, labels.copy()).passed
    wrong = labels.copy()
    wrong[1] = 8
    assert not diff_arrays("labels", labels, wrong).passed
    mask = np.array([True, False, True])
    assert diff_arrays("mask", mask, mask.copy()).passed
    assert not diff_arrays("mask", mask, ~mask).passed
    unsigned = np.array([0, 5], dtype=np.uint8)  # unsigned subtraction must not wrap
    row = diff_arrays("u", unsigned, np.array([1, 5], dtype=np.uint8), rel_tol=1.0, mean_tol=1.0)
    assert row.max_abs == 1.0
    big = np.array([2**60], dtype=np.int64)  # identical as float64, different as int64
    assert not diff_arrays("big", big, big + 1).passed
    assert diff_arrays("loss", 0.5, 0.5).passed
    assert not diff_arrays("loss", 0.5, 0.6).passed
    assert diff_arrays("loss", 0.5, 0.6).ref_shape == ()


def test_first_failure_in_order():
    ok = diff_arrays("a", 1.0, 1.0)
    bad = diff_arrays("b", 1.0, 2.0)
    assert first_failure([ok, ok]) is None
    assert first_failure([ok, bad, ok, bad]) == 1
    assert first_failure([]) is None


# ---------------------------------------------------------------- reprod_log


def test_reprod_log_diff_writes_three_files_and_returns_means(tmp_path):
    paddle = {"logits": np.ones((2, 3), np.float32), "loss": np.array(0.5, np.float32)}
    torch = {"logits": np.full((2, 3), 1.5, np.float32), "loss": np.array(0.5, np.float32)}
    means = reprod_log_diff(paddle, torch, tmp_path, "forward", diff_threshold=1e-5)
    assert means == {"logits": pytest.approx(0.5), "loss": 0.0}
    for suffix in ("paddle.npy", "torch.npy", "diff.log"):
        assert (tmp_path / f"forward_{suffix}").is_file()
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]
    saved = np.load(tmp_path / "forward_paddle.npy", allow_pickle=True).tolist()
    np.testing.assert_array_equal(saved["logits"], paddle["logits"])
    log = (tmp_path / "forward_diff.log").read_text()
    assert "logits" in log and "failed" in log
    assert not reprod_log_passed(means, 1e-5)

    # A second stage in the same process gets its own log and leaves the first one alone
    # (reprod_log's report leaves its file handler on the root logger).
    reprod_log_diff(paddle, paddle, tmp_path, "loss", diff_threshold=1e-5)
    second = (tmp_path / "loss_diff.log").read_text()
    assert "logits" in second and "diff check passed" in second and "failed" not in second
    assert (tmp_path / "forward_diff.log").read_text() == log


def test_reprod_log_lines_reach_the_console_only_when_asked(tmp_path, capfd):
    import logging
    import sys

    # As paddle.distributed.utils.launch_utils does on import (outside pytest, whose own
    # handlers make Paddle skip it): a stderr handler on the logger reprod_log uses.
    other = logging.StreamHandler(sys.stderr)
    logging.getLogger("root").addHandler(other)
    try:
        paddle = {"logits": np.ones((2, 3), np.float32)}
        torch = {"logits": np.full((2, 3), 1.5, np.float32)}
        reprod_log_diff(paddle, torch, tmp_path, "quiet", diff_threshold=1e-5)
    finally:
        logging.getLogger("root").removeHandler(other)
    captured = capfd.readouterr()
    assert "logits" not in captured.out and "logits" not in captured.err
    assert "diff check failed" in (tmp_path / "quiet_diff.log").read_text()
    echo_reprod_log(True)
    try:
        reprod_log_diff(paddle, torch, tmp_path, "loud", diff_threshold=1e-5)
    finally:
        echo_reprod_log(False)
    assert "diff check failed" in capfd.readouterr().out
    assert "diff check failed" in (tmp_path / "loud_diff.log").read_text()


def test_reprod_log_nan_does_not_pass_our_verdict(tmp_path):
    paddle = {"out": np.array([np.nan, 1.0], np.float32)}
    torch = {"out": np.array([1.0, 1.0], np.float32)}
    means = reprod_log_diff(paddle, torch, tmp_path, "nan", diff_threshold=1e-5)
    assert math.isnan(means["out"])
    assert not reprod_log_passed(means, 1e-5)
    assert not diff_arrays("out", torch["out"], paddle["out"]).passed


def test_reprod_log_diff_reports_shape_mismatch_and_missing_keys(tmp_path):
    paddle = {"a": np.zeros((2, 3)), "only_paddle": np.zeros(1)}
    torch = {"a": np.zeros((3, 2)), "only_torch": np.zeros(1)}
    means = reprod_log_diff(paddle, torch, tmp_path, "shapes", diff_threshold=1e-5)
    assert set(means) == {"a", "only_paddle", "only_torch"}
    assert all(math.isnan(v) for v in means.values())
    log = (tmp_path / "shapes_diff.log").read_text()
    assert "shape mismatch" in log and "missing in torch" in log and "missing in paddle" in log


# ---------------------------------------------------------------- capture


def _torch_net():
    import torch
    from torch import nn

    class Split(nn.Module):
        def forward(self, x):
            return x[:, :2], x[:, 2:]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.relu = nn.ReLU(inplace=True)  # reused; in-place, so records must be copies
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.split = Split()
            self.head = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Conv2d(2, 1, 1))

        def forward(self, x):
            x = self.relu(self.bn(self.conv1(x)))
            x = self.relu(self.conv2(x))
            left, right = self.split(x)
            return self.head(left) + right.sum(1, keepdim=True)

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.2, 0.2)
    return net.eval()


def _paddle_net(torch_net, extra_layer=False):
    import paddle
    from paddle import nn

    class Split(nn.Layer):
        def forward(self, x):
            return x[:, :2], x[:, 2:]

    class Net(nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2D(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2D(4)
            self.relu = nn.ReLU()
            self.conv2 = nn.Conv2D(4, 4, 1)
            self.split = Split()
            self.head = nn.Sequential(nn.Conv2D(2, 2, 1), nn.Conv2D(2, 1, 1))
            self.extra = nn.Identity() if extra_layer else None

        def forward(self, x):
            x = self.relu(self.bn(self.conv1(x)))
            x = self.relu(self.conv2(x))
            if self.extra is not None:
                x = self.extra(x)
            left, right = self.split(x)
            return self.head(left) + right.sum(1, keepdim=True)

    net = Net()
    names = {"running_mean": "_mean", "running_var": "_variance"}
    params = dict(net.state_dict())
    for key, value in torch_net.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        prefix, _, leaf = key.rpartition(".")
        params[f"{prefix}.{names.get(leaf, leaf)}"].set_value(value.numpy())
    net.eval()
    return net, paddle


def _input():
    return np.random.default_rng(1).normal(size=(2, 3, 6, 6)).astype(np.float32)


def _record_torch():
    import torch

    from align.engine.capture import TorchRecorder

    net = _torch_net()
    with TorchRecorder(net) as recorder, torch.no_grad():
        net(torch.from_numpy(_input()))
    return recorder.records


def test_torch_recorder_keys_in_execution_order_with_repeat_suffix():
    records = _record_torch()
    assert list(records) == [
        "conv1", "bn", "relu", "conv2", "relu#1", "split[0]", "split[1]", "head.0", "head.1",
    ]
    # The in-place ReLU ran after BN; the BN record must still hold negative values.
    assert (records["bn"] < 0).any()
    assert (records["relu"] >= 0).all()


def test_torch_recorder_removes_hooks_even_on_error():
    import torch

    from align.engine.capture import TorchRecorder

    net = _torch_net()
    with pytest.raises(RuntimeError):
        with TorchRecorder(net):
            net(torch.zeros(1, 5, 6, 6))  # wrong channel count
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(KeyError, match="conv_1"):
        TorchRecorder(net, names=["conv_1"])


def test_paddle_comparer_all_rows_pass_on_equal_models():
    from align.engine.capture import PaddleComparer

    torch_net = _torch_net()
    reference = _record_torch()
    net, paddle = _paddle_net(torch_net)
    with PaddleComparer(net, reference, rel_tol=1e-5, mean_tol=1e-5) as comparer:
        net(paddle.to_tensor(_input()))
    assert [r.name for r in comparer.rows] == list(reference)
    assert all(r.passed for r in comparer.rows), [r.reason for r in comparer.rows if not r.passed]
    assert all(not layer._forward_post_hooks for layer in net.sublayers())


def test_perturbed_parameter_is_the_first_failing_layer():
    from align.engine.capture import PaddleComparer, perturb_parameter

    torch_net = _torch_net()
    reference = _record_torch()
    net, paddle = _paddle_net(torch_net)
    before = net.conv2.weight.numpy().copy()
    sigma = perturb_parameter(net, "conv2.weight", scale=1e-2, seed=0)
    assert sigma > 0 and not np.array_equal(before, net.conv2.weight.numpy())
    with PaddleComparer(net, reference, rel_tol=1e-5, mean_tol=1e-5) as comparer:
        net(paddle.to_tensor(_input()))
    index = first_failure(comparer.rows)
    assert comparer.rows[index].name == "conv2"
    assert all(r.passed for r in comparer.rows[:index])
    with pytest.raises(KeyError, match=r"conv2\.weight"):
        perturb_parameter(net, "conv2.wieght")


def test_perturb_all_zero_parameter_changes_it():
    from align.engine.capture import perturb_parameter

    net, _ = _paddle_net(_torch_net())
    net.head[0].bias.set_value(np.zeros(2, np.float32))
    perturb_parameter(net, "head.0.bias", scale=1e-3, seed=3)
    assert np.abs(net.head[0].bias.numpy()).max() > 0


def test_paddle_comparer_reports_missing_layers_on_both_sides():
    from align.engine.capture import PaddleComparer

    torch_net = _torch_net()
    reference = {}
    for key, value in _record_torch().items():
        if key != "conv2":  # paddle produces it: "missing in reference"
            reference[key] = value
        if key == "relu":  # paddle never produces it: "missing in paddle"
            reference["ghost"] = np.zeros(1)
    net, paddle = _paddle_net(torch_net, extra_layer=True)
    with PaddleComparer(net, reference) as comparer:
        net(paddle.to_tensor(_input()))
    reasons = {r.name: r.reason for r in comparer.rows if not r.passed}
    assert reasons == {
        "ghost": "missing in paddle",
        "conv2": "missing in reference",
        "extra": "missing in reference",
    }
    names = [r.name for r in comparer.rows]
    assert names.index("ghost") == names.index("relu") + 1  # placed where the reference had it
    assert comparer.rows[first_failure(comparer.rows)].name == "ghost"


def test_paddle_comparer_removes_hooks_on_error():
    from align.engine.capture import PaddleComparer

    net, paddle = _paddle_net(_torch_net())
    with pytest.raises(Exception):
        with PaddleComparer(net, {}):
            net(paddle.zeros([1, 5, 6, 6]))
    assert all(not layer._forward_post_hooks for layer in net.sublayers())


# ---------------------------------------------------------------- report

EVIL = "<script>alert(1)</script>"


def _result(passed_layers=True):
    ok = diff_arrays(EVIL, np.ones(3), np.ones(3))
    layers = [diff_arrays("backbone.conv1", np.ones(2), np.ones(2))]
    layers.append(diff_arrays("backbone.relu", np.ones(2), np.ones(2) * (1 if passed_layers else 2)))
    layers.append(diff_arrays("backbone.relu#1", np.ones(2), np.array([np.nan, 1.0])))
    if passed_layers:
        layers = layers[:2]
    return StageResult(
        stage="forward",
        title="Forward " + EVIL,
        passed=passed_layers,
        tensors=[ok],
        layers=layers,
        thresholds={"rel_tol": 1e-5, "mean_tol": 1e-5},
        meta={"seed": 0, "input_shape": (2, 3, 64, 64), "note": EVIL, "mean": np.float32(0.25)},
        env={"python": "3.11"},
        extra_tables=[("Extra " + EVIL, ["key", "value"], [[EVIL, 1.5e-7]])],
        figures=[("figure " + EVIL, b"\x89PNG fake bytes")],
        reprod_log={"cls": 1e-7, "loss": 0.0},
        reprod_log_threshold=1e-5,
    )


def test_report_escapes_names_and_is_self_contained(tmp_path):
    json_path, html_path = write_stage_report(_result(passed_layers=True), tmp_path)
    html = html_path.read_text()
    assert EVIL not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"""(src|href)=["'](?!#|data:|[\w.-]+\.html)""", html)
    assert "data:image/png;base64," in html
    for payload in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html):
        assert b"http" not in base64.b64decode(payload)  # matplotlib's PNG "Software" chunk has a URL
    assert "1.500e-07" in html  # scientific notation
    assert "PASS" in html and "banner pass" in html
    assert 'id="first-divergence"' not in html
    document = json.loads(json_path.read_text())
    assert document["passed"] is True and document["first_divergence"] is None
    assert document["tensors"][0]["name"] == EVIL
    assert document["reprod_log"] == {"cls": 1e-7, "loss": 0.0}
    assert document["meta"]["input_shape"] == [2, 3, 64, 64] and document["meta"]["mean"] == 0.25


def test_failing_report_links_first_divergence(tmp_path):
    json_path, html_path = write_stage_report(_result(passed_layers=False), tmp_path)
    html = html_path.read_text()
    assert "banner fail" in html and "FAIL" in html
    assert '<a href="#first-divergence">backbone.relu</a>' in html
    assert html.count('id="first-divergence"') == 1
    row = re.search(r'<tr class="([^"]*)" id="first-divergence">\s*<td class="num">(\d+)</td>\s*<td class="name">([^<]*)<', html)
    assert row and "fail" in row.group(1) and row.group(2) == "1" and row.group(3) == "backbone.relu"
    document = json.loads(json_path.read_text())
    assert document["passed"] is False
    assert document["first_diverging_layer"] == "backbone.relu"
    assert document["layers"][2]["max_abs"] == "nan"


def test_report_verdict_fails_on_failing_row_or_nan_reprod_log(tmp_path):
    result = _result(passed_layers=False)
    result.passed = True
    json_path, _ = write_stage_report(result, tmp_path)
    assert json.loads(json_path.read_text())["passed"] is False

    result = _result(passed_layers=True)
    result.reprod_log["nan_key"] = float("nan")  # reprod_log itself would call this a pass
    json_path, html_path = write_stage_report(result, tmp_path)
    document = json.loads(json_path.read_text())
    assert document["passed"] is False and document["reprod_log"]["nan_key"] == "nan"
    assert "banner fail" in html_path.read_text()


def test_index_lists_stages_with_verdicts(tmp_path):
    write_stage_report(_result(passed_layers=True), tmp_path)
    failing = _result(passed_layers=False)
    failing.stage = "loss"
    failing.title = "Loss"
    write_stage_report(failing, tmp_path)
    (tmp_path / "orphan.json").write_text(json.dumps({"stage": "orphan", "passed": True}))
    (tmp_path / "unrelated.json").write_text("[1, 2]")
    (tmp_path / "unrelated.html").write_text("x")
    index = write_index(tmp_path).read_text()
    assert 'href="forward.html"' in index and 'href="loss.html"' in index
    assert "orphan" not in index and "unrelated" not in index
    assert index.index("forward.html") < index.index("loss.html")
    assert re.search(r'<tr class="fail">\s*<td><a href="loss.html">', index)
    assert re.search(r'<tr class="pass">\s*<td><a href="forward.html">', index)
    assert EVIL not in index
    assert "http://" not in index and "https://" not in index
    # The client's order comes first, whatever the alphabet says.
    index = write_index(tmp_path, order=("loss", "forward")).read_text()
    assert index.index("loss.html") < index.index("forward.html")


def test_environment_info_and_sha256(tmp_path):
    info = environment_info(PACKAGES)
    for key in ("python", "platform", "cpu_count", "torch", "paddle", "mmdet", "mmcv", "mmengine",
                "numpy", "reprod_log", "git_commit", "timestamp_utc"):
        assert key in info
    assert info["numpy"] == np.__version__
    assert info["timestamp_utc"].endswith("+00:00")
    path = tmp_path / "blob.bin"
    path.write_bytes(b"abc")
    assert sha256_of(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_report_says_when_reprod_log_and_the_verdict_disagree(tmp_path):
    # reprod_log's absolute mean check fails an entry the stage's relative bound accepts.
    result = _result(passed_layers=True)
    result.reprod_log_threshold = None
    result.reprod_log = {"iter0.loss.total": 2e-6, "cls": 1e-8}
    result.reprod_log_check = 1e-6
    result.reprod_log_why = "loss terms are bounded relative to their size"
    json_path, html_path = write_stage_report(result, tmp_path)
    sentence = json.loads(json_path.read_text())["reprod_log_disagreement"]
    assert "diff check failed" in sentence and "1 of 2" in sentence and "iter0.loss.total" in sentence
    assert "loss terms are bounded relative to their size" in sentence and "passes" in sentence
    assert "diff check failed" in html_path.read_text()

    # The other way round: reprod_log's mean passes, the verdict fails on a maximum.
    failing = _result(passed_layers=False)
    failing.reprod_log_threshold = None
    failing.reprod_log_check = 1.0
    sentence = json.loads(write_stage_report(failing, tmp_path)[0].read_text())["reprod_log_disagreement"]
    assert "passes every entry, yet the stage fails at backbone.relu" in sentence

    # Agreement: no sentence.
    agreeing = _result(passed_layers=True)
    agreeing.reprod_log_check = 1e-5
    assert json.loads(write_stage_report(agreeing, tmp_path)[0].read_text())["reprod_log_disagreement"] is None


def test_index_shows_headline_times_and_side_run(tmp_path):
    result = _result(passed_layers=True)
    result.headline = Headline.worst(result.layers, 1e-5, "worst layer rel")
    result.seconds = {"mmdet": 12.25, "paddle": 8.5}
    result.side_run = "float32: 10 ReLU flips (not part of the verdict)"
    document = json.loads(write_stage_report(result, tmp_path)[0].read_text())
    assert document["headline"] == {"label": "worst layer rel", "value": 0.0, "bound": 1e-5,
                                    "where": "backbone.conv1"}
    index = (tmp_path / "index.html").read_text()
    assert "worst layer rel" in index and "1.000e-05" in index
    assert "mmdet 12.2 s" in index and "paddle 8.5 s" in index and "10 ReLU flips" in index
    # Named rows are written as plain lists.
    assert document["extra_tables"][0]["rows"] == [[EVIL, 1.5e-7]]


def test_headline_ranks_nan_first():
    rows = [diff_arrays("a", np.ones(2), np.ones(2) * 1.5), diff_arrays("b", np.ones(2), np.array([np.nan, 1]))]
    assert Headline.worst(rows, None).where == "b"
    assert Headline.largest_abs(rows, None).where == "b"
    assert Headline.worst([], None) is None


def test_stage_runner_keeps_library_prints_off_the_console(tmp_path, capsys):
    from align.engine.cli import run_stage

    import logging
    import sys

    def run():
        print("loading annotations into memory...")
        logging.getLogger("some.library").warning("COCO bbox evaluation: table")
        return _result(passed_layers=True)

    # As Paddle leaves it: a stderr handler on the root logger.
    stderr_handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(stderr_handler)

    try:
        status = run_stage(run, label=lambda r: "forward", summary=lambda r: "(1 compared)",
                           first_divergence=lambda r: None, report=tmp_path / "forward.html")
    finally:
        logging.getLogger().removeHandler(stderr_handler)
    captured = capsys.readouterr()
    assert status == 0 and captured.out.splitlines() == ["forward: PASS  (1 compared)",
                                                         f"report: {tmp_path / 'forward.html'}"]
    assert "COCO bbox" not in captured.err
    console_log = (tmp_path / "forward_console.log").read_text()
    assert "loading annotations" in console_log and "COCO bbox evaluation: table" in console_log
    status = run_stage(run, label=lambda r: "forward", summary=lambda r: "", verbose=True,
                       first_divergence=lambda r: None, report=tmp_path / "forward.html")
    assert "loading annotations" in capsys.readouterr().out


def test_reference_cache_trusts_only_matching_files(tmp_path):
    from align.engine.cache import ReferenceCache, cache_key

    cache = ReferenceCache(tmp_path / "cache")
    key = cache_key({"checkpoint": "abc", "shape": [1, 3, 8, 8]})
    assert key != cache_key({"checkpoint": "abc", "shape": [1, 3, 8, 9]})
    assert cache.load("forward", key) is None and cache.last_status == "miss"
    arrays = {"out:x": np.arange(6.0).reshape(2, 3), "layer:conv#1": np.ones(4, np.float32)}
    path = cache.save("forward", key, arrays)
    loaded = cache.load("forward", key)
    assert cache.last_status == "hit" and set(loaded) == set(arrays)
    np.testing.assert_array_equal(loaded["out:x"], arrays["out:x"])
    assert isinstance(loaded["layer:conv#1"], np.memmap) and not loaded["layer:conv#1"].flags.writeable
    assert cache.load("forward", cache_key({"other": 1})) is None
    assert not list(path.glob(".*tmp*"))
    files = sorted(path.glob("*.npy"))
    assert len(files) == 2
    original = files[1].read_bytes()
    # A file that no longer matches its recorded digest, though its shape and dtype still do.
    files[1].write_bytes(original[:-4] + np.float32(2).tobytes())
    assert cache.load("forward", key) is None and cache.last_status == "mismatch"
    files[1].write_bytes(original[:-4])  # truncated
    assert cache.load("forward", key) is None and cache.last_status == "mismatch"
    files[1].unlink()  # missing
    assert cache.load("forward", key) is None and cache.last_status == "mismatch"
    files[1].write_bytes(original)
    assert cache.load("forward", key) is not None and cache.last_status == "hit"
    (path / "manifest.json").write_text("{")  # a manifest cut short
    assert cache.load("forward", key) is None and cache.last_status == "mismatch"
    # Saving again replaces the entry.
    cache.save("forward", key, {"out:y": np.zeros((), np.float64)})
    reloaded = cache.load("forward", key)
    assert set(reloaded) == {"out:y"} and reloaded["out:y"].shape == ()
    # One entry per name: another key replaces it, entries of other names stay.
    other = cache.save("forward-extra", key, {"a": np.ones(2)})
    newer = cache.save("forward", cache_key({"checkpoint": "def"}), {"out:z": np.ones(1)})
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([newer.name, other.name])
    assert cache.load("forward", key) is None and cache.last_status == "miss"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_worst_named_is_the_whole_array_figure_over_many_blocks(dtype):
    from align.engine.compare import _BLOCK, worst_named

    rng = np.random.default_rng(0)
    ref = {name: rng.normal(size=size).astype(dtype) for name, size in (("a", 3 * _BLOCK + 7), ("b", 11))}
    test = {name: (value + rng.normal(size=value.shape) * 1e-6).astype(dtype) for name, value in ref.items()}
    # The largest difference sits in the last, partial block of "a".
    test["a"][-1] += dtype(1e-3)
    expected = {n: float(np.abs(test[n] - ref[n]).max()) / float(np.abs(ref[n]).max()) for n in ref}
    rel, name = worst_named("grad", ref, test)
    assert name == "grad.a" and rel == pytest.approx(expected["a"], rel=1e-12)
    test["b"][3] = np.nan
    assert worst_named("grad", ref, test)[1] == "grad.b" and math.isnan(worst_named("grad", ref, test)[0])
    test["b"][3] = ref["b"][3]
    test["c"] = np.zeros(2, dtype)
    assert worst_named("grad", ref, test)[1] == "grad.c"
