"""The FPN's top-down upsampling equals Paddle's nearest interpolation element for element."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddle_impl.model.fpn import upsample_nearest_to


@pytest.mark.parametrize("height", [1, 2, 5, 25, 26, 50, 99, 100])
def test_upsampling_is_nearest_interpolation_bit_for_bit(height):
    rng = np.random.default_rng(height)
    for width in (1, 3, 8, 167, 168):
        x = paddle.to_tensor(rng.standard_normal((2, 3, (height + 1) // 2, (width + 1) // 2)).astype(np.float32))
        like = paddle.zeros([2, 3, height, width])
        want = F.interpolate(x, size=[height, width], mode="nearest").numpy()
        got = upsample_nearest_to(x, like).numpy()
        assert got.shape == want.shape
        assert np.array_equal(got, want)
