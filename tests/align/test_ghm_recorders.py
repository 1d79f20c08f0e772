"""Our GHM recorder keeps each call's g in the prediction's shape, as mmdet's recorder does,
whatever layout the loss bins internally (GHM-R bins a flat view of its (N, 4) elements)."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from align.ghm.recorders import PaddleGHMRecorder
from paddle_impl.model.ghm_loss import GHMC, GHMR


@pytest.mark.parametrize("rows", [50, 70_000])  # below and above the size where GHM-R splits its work
def test_ghmr_g_is_kept_in_the_predictions_shape(rows):
    layer = GHMR(mu=0.02, bins=10, momentum=0.7, loss_weight=10.0)
    rng = np.random.default_rng(0)
    pred = paddle.to_tensor(rng.normal(size=(rows, 4)).astype("float32"))
    weights = (rng.random((rows, 4)) > 0.5).astype("float32")
    with PaddleGHMRecorder(layer, keep_g=True) as recorder:
        layer(pred, paddle.zeros([rows, 4]), paddle.to_tensor(weights))
    g, valid = recorder.g[0]
    assert g.shape == (rows, 4) and valid.shape == (rows, 4)
    np.testing.assert_array_equal(valid, weights > 0)
    d = pred.numpy().astype(np.float64)
    np.testing.assert_allclose(g, np.abs(d) / np.sqrt(d * d + 0.02 ** 2), rtol=1e-6)


def test_ghmc_g_keeps_its_shape():
    layer = GHMC(bins=30, momentum=0.75)
    pred = paddle.to_tensor(np.random.default_rng(1).normal(size=(20, 80)).astype("float32"))
    with PaddleGHMRecorder(layer, keep_g=True) as recorder:
        layer(pred, paddle.zeros([20, 80]), paddle.ones([20, 80]))
    g, valid = recorder.g[0]
    assert g.shape == (20, 80) and valid.shape == (20, 80)
