"""The numpy-backed CPU kernels of the GHM losses against float64 and Paddle's own kernels."""
import numpy as np
import paddle
import pytest

from paddle_impl.model import cpu_kernels

HALF_ULP = float(np.finfo(np.float32).eps) / 2


def _tails(seed: int) -> np.ndarray:
    """exp(-|x|) for logits as the head gives them, wide ones and the extremes."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(-4.6, 1.5, 50_000), rng.uniform(-90, 90, 50_000),
                        [0.0, 1e-30, 17.0, 88.0, 103.0, 104.0]]).astype(np.float32)
    return np.exp(-np.abs(x))


def test_log1p_is_correctly_rounded_in_place():
    y = _tails(0)
    tensor = paddle.to_tensor(y)
    out = cpu_kernels.log1p_(tensor)
    assert out is tensor
    exact = np.log1p(y.astype(np.float64))
    got = tensor.numpy().astype(np.float64)
    nonzero = exact > 0
    # Rounded once from float64: within half an ulp of the exact value
    # (numpy's float32 log1p is up to 1.9 ulp off, Paddle's 0.75).
    assert np.all(np.abs(got - exact)[nonzero] <= HALF_ULP * exact[nonzero] * (1 + 1e-6))
    assert np.array_equal(got[~nonzero], exact[~nonzero])


def test_log1p_float64_and_special_values():
    y = np.array([0.0, -0.0, 1.0, np.inf, np.nan, -1.0, 1e-300], np.float64)
    tensor = paddle.to_tensor(y)
    cpu_kernels.log1p_(tensor)
    np.testing.assert_array_equal(tensor.numpy(), np.log1p(y))


@pytest.mark.parametrize("id_dtype", ["uint8", "int32"])
def test_take_equals_gather(id_dtype):
    rng = np.random.default_rng(1)
    table = paddle.to_tensor(rng.random(256).astype(np.float32))
    ids = paddle.to_tensor(rng.integers(0, 256, (37, 80)).astype(id_dtype))
    got = cpu_kernels.take(table, ids)
    want = paddle.gather(table, ids.reshape([-1]).astype("int32")).reshape(ids.shape)
    assert got.shape == ids.shape and got.dtype == table.dtype
    np.testing.assert_array_equal(got.numpy(), want.numpy())


def _asl1_inputs(seed: int, dtype: str, shape=(4096, 4)):
    rng = np.random.default_rng(seed)
    pred = rng.normal(0, 0.5, shape).astype(dtype)
    target = rng.normal(0, 0.5, shape).astype(dtype)
    # Exact zeros, signed zeros, tiny, huge and non-finite differences.
    pred[:8, 0] = [0.0, -0.0, 1e-30, 3e38, np.inf, -np.inf, np.nan, 0.02]
    target[:8, 0] = [0.0, 0.0, 0.0, -3e38, 1.0, -np.inf, 0.0, 0.0]
    return pred, target


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("span", [None, (64, 1024)])
def test_asl1_host_path_against_float64_and_the_device_path(dtype, span):
    """numpy's square root is correctly rounded, Paddle's and torch's float32
    ones are not (each off by an ulp for about one value in seven, not the
    same ones): the host path is at least as close to float64 as the device
    path, within an ulp or two of it, and non-finite where it is."""
    from paddle_impl.model.ghm_elementwise import DeltasASL1

    pred, target = _asl1_inputs(2, dtype)
    mu = 0.02
    weight = np.ones(pred.shape, np.float32)
    problem = DeltasASL1(paddle.to_tensor(pred), paddle.to_tensor(target), paddle.to_tensor(weight), mu)
    with paddle.no_grad():
        rows = problem.rows(problem.values, span), problem.rows(problem.target, span)
        host = [t.numpy() for t in problem._host_derivative(*rows, None)]
        device = [t.numpy() for t in problem._device_derivative(*rows, None)]
    # The predictions are flat (every input has their shape): a span is of elements.
    taken = slice(None) if span is None else slice(*span)
    with np.errstate(invalid="ignore", over="ignore"):
        # Both paths round the difference first; the root and the quotient
        # are what differs.
        diff = (pred.reshape(-1)[taken] - target.reshape(-1)[taken]).astype(np.float64)
        root = np.sqrt(diff * diff + mu * mu)
        exact = diff / root
    eps = float(np.finfo(dtype).eps)
    # The loss root - mu cancels where |d| << mu: compared with the device path only.
    np.testing.assert_allclose(host[1], device[1], rtol=4 * eps, atol=4 * eps * mu)
    for got, other, want in [(host[0], device[0], exact)]:
        assert got.dtype == np.dtype(dtype) and got.shape == want.shape
        assert np.array_equal(np.isnan(got), np.isnan(other)) and np.array_equal(np.isinf(got), np.isinf(other))
        finite = np.isfinite(got) & np.isfinite(want) & (want != 0)
        error = np.abs(got[finite] - want[finite]) / np.abs(want[finite])
        other_error = np.abs(other[finite] - want[finite]) / np.abs(want[finite])
        assert error.max() <= other_error.max() and error.max() <= 3 * eps
        np.testing.assert_allclose(got[finite], other[finite], rtol=4 * eps)


def test_asl1_host_path_broadcasts_a_target():
    from paddle_impl.model.ghm_elementwise import DeltasASL1

    pred, _ = _asl1_inputs(3, "float32", (64, 4))
    target = np.float32(0.25)
    problem = DeltasASL1(paddle.to_tensor(pred), paddle.to_tensor(target), paddle.ones([64, 4]), 0.02)
    with paddle.no_grad():
        host = problem._host_derivative(problem.values, problem.target, None)
        device = problem._device_derivative(problem.values, problem.target, None)
    assert host[0].shape == device[0].shape == [64, 4]
    eps = float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(host[0].numpy(), device[0].numpy(), rtol=4 * eps)
    np.testing.assert_allclose(host[1].numpy(), device[1].numpy(), rtol=4 * eps, atol=4 * eps * 0.02)


@pytest.mark.parametrize("values", [
    np.array([0.0, -0.0, 1e-45, -1e-45, np.nan, np.inf, -np.inf, 2.0], np.float32),
    np.array([[0.5, 0.0], [np.nan, 3.0]], np.float64),
    np.array([0, 1, -1, 7], np.int64),
    np.array([True, False, True]),
    np.array(0.25, np.float32),
])
def test_positive_and_logical_not_are_paddles(values):
    tensor = paddle.to_tensor(values)
    mask = cpu_kernels.positive(tensor)
    assert mask.dtype == paddle.bool and mask.shape == tensor.shape
    np.testing.assert_array_equal(mask.numpy(), (tensor > 0).numpy())
    negation = cpu_kernels.logical_not(mask)
    assert negation.dtype == paddle.bool and negation.shape == tensor.shape
    np.testing.assert_array_equal(negation.numpy(), paddle.logical_not(mask).numpy())
