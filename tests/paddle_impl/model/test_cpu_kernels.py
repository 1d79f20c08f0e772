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
