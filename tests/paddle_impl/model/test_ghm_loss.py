"""GHM-C and GHM-R in Paddle against mmdet 3.3.0's own ``GHMC`` and ``GHMR``.

Every comparison builds mmdet's module and ours with the same options and
feeds both the same numpy arrays, float32 except in the tests of input dtypes.
Inputs stay small: the point is the semantics (regions, edges, momentum,
reductions, gradients, dtypes, state dicts), not scale.

What is compared, and how closely:

* the per-element GHM weights and ``acc_sum``: relative 1e-6. mmdet's weights
  are read off its forward with ``weight_reduce_loss`` made to return them
  (`mmdet_weights`); ours come from ``harmonizing_weights``.
* the losses: relative 1e-6 plus the rounding of the element-wise loss, which
  the two libraries do not compute identically, times each element's weight.
  For the binary cross-entropy torch evaluates ``(1 - t) * x -
  log_sigmoid(x)``, whose cancellation costs up to about one unit in the last
  place of |x|, and ours ``max(x, 0) - t * x + log1p(exp(-|x|))``: an element
  may differ by ``2 * eps * max(|x|, 1)``. For the ASL1 loss neither library's float32
  ``sqrt`` is correctly rounded on this CPU (each is off by an ulp for a
  good share of inputs), and ``sqrt(d^2 + mu^2) - mu`` keeps that absolute
  error: ``4 * eps * (|d| + mu)``. An element placed in the wrong region
  changes weights by a percent or more, far above these bounds.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import paddle
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mmdet.models.losses import GHMC as MMDetGHMC
from mmdet.models.losses import GHMR as MMDetGHMR

from paddle_impl.config import get_config
from paddle_impl.model import ghm_chunks, ghm_host
from paddle_impl.model.ghm_elementwise import DeltasASL1
from paddle_impl.model.ghm_loss import GHMC, GHMR, build_ghmc, build_ghmr
from paddle_impl.model.gradient_density import (BYTE_TABLE_SIZE, bin_edges, byte_regions, byte_regions_apply,
                                                  exclusion, truncation_is_exact)

RTOL = 1e-6
EPS32 = float(np.finfo(np.float32).eps)

# A logit this negative has sigmoid exactly 0 in float32 in both libraries, so
# with a soft target t the gradient norm |sigmoid(x) - t| is exactly t.
SATURATED = -200.0

# The path fixture below is function-scoped on purpose: one path per test, the
# same for all of its examples.
HYPOTHESIS = settings(max_examples=25, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True, params=["host", "chunked"])
def ghm_path(request, monkeypatch):
    """Every test runs on both paths of a call: small CPU calls take `ghm_host`'s
    numpy path ("host"), which "chunked" turns off so that they take the chunked
    passes the large levels take."""
    if request.param == "chunked":
        monkeypatch.setattr(ghm_host, "applies", lambda *args: False)
    return request.param


# ----------------------------------------------------------------- helpers


def _torch(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, requires_grad=grad)


def _paddle(a: np.ndarray, grad: bool = False) -> paddle.Tensor:
    return paddle.to_tensor(a, stop_gradient=not grad)


def run_both(ours, theirs, inputs, **kwargs):
    """(ours, mmdet's) numpy outputs of one call on the same numpy inputs."""
    got = ours(*[_paddle(a) for a in inputs], **kwargs)
    want = theirs(*[_torch(a) for a in inputs], **kwargs)
    return got.numpy(), want.detach().numpy()


@contextmanager
def weights_returned_by_mmdet():
    """mmdet's GHM losses with ``weight_reduce_loss`` returning the weights,
    so that their forward returns the per-element weights times
    ``loss_weight``."""
    import mmdet.models.losses.ghm_loss as ghm_module

    real = ghm_module.weight_reduce_loss
    ghm_module.weight_reduce_loss = lambda loss, weights, reduction, avg_factor: weights
    try:
        yield
    finally:
        ghm_module.weight_reduce_loss = real


def mmdet_weights(theirs, inputs) -> np.ndarray:
    """mmdet's per-element weights for a call with ``inputs``, computed on a
    copy so that ``theirs`` keeps its state."""
    theirs = copy.deepcopy(theirs)
    with weights_returned_by_mmdet():
        out = theirs(*[_torch(a) for a in inputs])
    return out.detach().numpy() / theirs.loss_weight


def our_weights(ours, inputs) -> np.ndarray:
    return copy.deepcopy(ours).harmonizing_weights(*[_paddle(a) for a in inputs]).numpy()


def loss_rounding(theirs, inputs) -> np.ndarray:
    """Per-element bound on the float32 loss difference between the sides."""
    pred, target = inputs[0], inputs[1]
    if isinstance(theirs, MMDetGHMC):
        return 2 * EPS32 * np.maximum(np.abs(pred), 1.0)
    return 4 * EPS32 * (np.abs(pred - target) + theirs.mu)


def normaliser(theirs, inputs) -> float:
    """mmdet's ``tot``: valid elements (GHM-C) or the weight sum (GHM-R)."""
    pred, _, label_weight = inputs
    if isinstance(theirs, MMDetGHMC):
        valid = np.broadcast_to((label_weight > 0).reshape(len(pred), -1), pred.shape)
        return max(float(valid.sum()), 1.0)
    return max(float(label_weight.astype(np.float32).sum()), 1.0)


def assert_within(got, want, atol, rtol=RTOL, what="loss"):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs mmdet {want.shape}"
    excess = np.abs(got - want) - (atol + rtol * np.abs(want))
    worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.ndim else ()
    assert (excess <= 0).all(), (
        f"{what}: ours {got[worst]!r} vs mmdet {want[worst]!r} at {worst}, "
        f"beyond tolerance by {excess[worst]:.3g}")


def compare(ours, theirs, inputs, reduction_override=None, what="call"):
    """One call of both modules: weights, loss and ``acc_sum`` compared.

    Returns:
        (ours, mmdet's) numpy outputs.
    """
    weights = mmdet_weights(theirs, inputs)
    assert_within(our_weights(ours, inputs), weights, atol=0.0, what=f"{what}: weights")
    got, want = run_both(ours, theirs, inputs, reduction_override=reduction_override)
    per_element = weights * theirs.loss_weight * loss_rounding(theirs, inputs)
    atol = per_element if got.ndim else per_element.sum() / normaliser(theirs, inputs)
    assert_within(got, want, atol, what=f"{what}: loss")
    assert_same_state(ours, theirs, what)
    return got, want


def assert_same_state(ours, theirs, what="call"):
    """``acc_sum`` equal to mmdet's; like mmdet's, it only exists when momentum > 0."""
    if theirs.momentum > 0:
        assert_within(ours.acc_sum.numpy(), theirs.acc_sum.numpy(), atol=0.0,
                      what=f"{what}: acc_sum")
    else:
        assert not hasattr(theirs, "acc_sum")
        assert not hasattr(ours, "acc_sum") and "acc_sum" not in ours.state_dict()


def classification_inputs(rng, n, c, pos_rate=0.1, ignore_rate=0.1, scale=3.0, index=True):
    """(N, C) logits, targets (class indices (N,) or one-hot (N, C)), weights."""
    logits = (scale * rng.standard_normal((n, c)) - 1.0).astype(np.float32)
    labels = np.where(rng.random(n) < pos_rate, rng.integers(0, c, n), c).astype(np.int64)
    weights = (rng.random(n) >= ignore_rate).astype(np.float32)
    if index:
        return logits, labels, weights
    onehot = (labels[:, None] == np.arange(c)[None, :]).astype(np.float32)
    return logits, onehot, np.repeat(weights[:, None], c, axis=1)


def regression_inputs(rng, n, pos_rate=0.3, scale=0.3):
    """(N, 4) deltas, targets and box weights (1 on positive rows, as the head sets them)."""
    pred = (scale * rng.standard_normal((n, 4))).astype(np.float32)
    target = (scale * rng.standard_normal((n, 4))).astype(np.float32)
    weights = np.repeat((rng.random(n) < pos_rate)[:, None], 4, axis=1).astype(np.float32)
    return pred, target, weights


def edges_f32(bins: int) -> np.ndarray:
    """Where mmdet puts the region boundaries up to 1: fl32(k / bins)."""
    return np.arange(bins + 1, dtype=np.float32) / np.float32(bins)


def with_neighbours(values: np.ndarray) -> np.ndarray:
    """Each float32 value with the float32 just below and just above it."""
    values = np.asarray(values, dtype=np.float32)
    below = np.nextafter(values, np.float32(-np.inf))
    above = np.nextafter(values, np.float32(np.inf))
    return np.stack([below, values, above], axis=1).ravel()


def distinct_repeats(values: np.ndarray) -> np.ndarray:
    """Value j repeated j + 1 times, so that every region ends up with its own
    count and an element placed in the wrong region changes some weight."""
    return np.concatenate([np.full(j + 1, v, dtype=np.float32) for j, v in enumerate(values)])


def ghmr_deltas_hitting(g_values: np.ndarray, mu: float) -> dict:
    """Float32 deltas d whose gradient norm |d| / sqrt(d*d + mu*mu) is exactly
    g in float32 in both libraries, for each g where such a d exists.

    torch's float32 sqrt is not correctly rounded (numpy's, which our module
    uses on the CPU, is), so the candidates (float32 values around the real
    solution) are evaluated with mmdet's operations in torch and by our
    module's own element-wise step.

    Returns:
        {g: d} for the values of ``g_values`` that some d reaches on both sides.
    """
    found = {}
    for g in np.asarray(g_values, dtype=np.float32):
        if g >= 1:
            candidates = np.float32([1e4])
        else:
            start = np.float32(mu * g / np.sqrt(1.0 - float(g) ** 2))
            offsets = np.arange(-512, 513, dtype=np.int32)
            candidates = (start.view(np.int32) + offsets).view(np.float32)
            candidates = candidates[candidates >= 0]
        c_torch = torch.from_numpy(candidates)
        g_torch = torch.abs(c_torch / torch.sqrt(mu * mu + c_torch * c_torch)).numpy()
        with paddle.no_grad():
            c_paddle = paddle.to_tensor(candidates)
            g_paddle = paddle.abs(DeltasASL1(c_paddle, paddle.zeros_like(c_paddle), paddle.ones_like(c_paddle),
                                             mu).derivative(None)).numpy()
        hits = candidates[(g_torch == g) & (g_paddle == g)]
        if hits.size:
            found[float(g)] = hits[0]
    return found


# ------------------------------------------------------- construction, API


@pytest.mark.parametrize("bins", [1, 3, 10, 30, 100])
def test_edges_are_bitwise_mmdets(bins):
    assert np.array_equal(GHMC(bins=bins).edges.numpy(), MMDetGHMC(bins=bins).edges.numpy())
    assert np.array_equal(GHMR(bins=bins).edges.numpy(), MMDetGHMR(bins=bins).edges.numpy())


def test_buffers_are_persistable_and_named_like_mmdet():
    ours, theirs = GHMC(bins=30, momentum=0.75), MMDetGHMC(bins=30, momentum=0.75)
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"edges", "acc_sum"}
    assert ours.acc_sum.dtype == paddle.float32 and ours.acc_sum.shape == [30]
    assert not ours.acc_sum.numpy().any()
    assert set(GHMR(momentum=0.7).state_dict()) == {"edges", "acc_sum"}


def test_factories_use_the_reference_configuration():
    cls_cfg = get_config()["bbox_head"]["loss_cls"]
    box_cfg = get_config()["bbox_head"]["loss_bbox"]
    cls, box = build_ghmc(), build_ghmr()
    assert (cls.bins, cls.momentum, cls.use_sigmoid, cls.loss_weight) == (
        cls_cfg["bins"], cls_cfg["momentum"], cls_cfg["use_sigmoid"], cls_cfg["loss_weight"])
    assert (box.mu, box.bins, box.momentum, box.loss_weight) == (
        box_cfg["mu"], box_cfg["bins"], box_cfg["momentum"], box_cfg["loss_weight"])
    assert build_ghmc(momentum=0).momentum == 0


def test_factories_match_mmdets_ghm_config_file():
    import mmdet
    from mmengine.config import Config

    path = Path(mmdet.__file__).parent / ".mim" / "configs/ghm/retinanet_r50_fpn_ghm-1x_coco.py"
    head = Config.fromfile(str(path)).model.bbox_head
    for ours, theirs in ((build_ghmc(), head.loss_cls), (build_ghmr(), head.loss_bbox)):
        for key, value in theirs.items():
            if key != "type":
                assert getattr(ours, key) == value, (theirs["type"], key)


def test_use_sigmoid_false_is_rejected_like_mmdet():
    with pytest.raises(NotImplementedError):
        MMDetGHMC(use_sigmoid=False)
    with pytest.raises(NotImplementedError):
        GHMC(use_sigmoid=False)


# --------------------------------------------------------- random inputs


@HYPOTHESIS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40), c=st.integers(1, 6),
       bins=st.sampled_from([1, 2, 3, 7, 10, 30, 100]), momentum=st.sampled_from([0.0, 0.75]),
       index=st.booleans(), reduction=st.sampled_from(["mean", "none"]),
       loss_weight=st.sampled_from([1.0, 2.5]), ignore_rate=st.sampled_from([0.0, 0.3, 1.0]))
def test_ghmc_random(seed, n, c, bins, momentum, index, reduction, loss_weight, ignore_rate):
    rng = np.random.default_rng(seed)
    options = dict(bins=bins, momentum=momentum, loss_weight=loss_weight, reduction=reduction)
    ours, theirs = GHMC(**options), MMDetGHMC(**options)
    for call in range(3):
        inputs = classification_inputs(rng, n, c, pos_rate=0.3, ignore_rate=ignore_rate, index=index)
        got, want = compare(ours, theirs, inputs, what=f"call {call}")
        assert np.isfinite(got).all() and np.isfinite(want).all()


@HYPOTHESIS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40),
       bins=st.sampled_from([1, 3, 10, 30, 100]), momentum=st.sampled_from([0.0, 0.7]),
       mu=st.sampled_from([0.02, 0.5]), reduction=st.sampled_from(["mean", "none"]),
       loss_weight=st.sampled_from([1.0, 10.0]), soft_weights=st.booleans())
def test_ghmr_random(seed, n, bins, momentum, mu, reduction, loss_weight, soft_weights):
    rng = np.random.default_rng(seed)
    options = dict(mu=mu, bins=bins, momentum=momentum, loss_weight=loss_weight, reduction=reduction)
    ours, theirs = GHMR(**options), MMDetGHMR(**options)
    for call in range(3):
        pred, target, weights = regression_inputs(rng, n)
        if soft_weights:
            # tot is the sum of the weights, not their count.
            weights = weights * rng.choice(np.float32([0.5, 1.0, 2.0]), size=weights.shape)
        compare(ours, theirs, (pred, target, weights), what=f"call {call}")


# ------------------------------------------------------ values on edges


@pytest.mark.parametrize("bins", [1, 2, 3, 10, 30, 100])
def test_ghmc_gradient_norms_on_every_edge(bins):
    """g exactly on each edge, one float below and one above, plus 0 and 1.

    A saturated logit has sigmoid exactly 0, so a soft target t gives g = t
    bit for bit on both sides, independently of either sigmoid kernel.
    """
    g = np.concatenate([[0.0, 1.0], with_neighbours(edges_f32(bins))]).astype(np.float32)
    g = np.unique(g[(g >= 0) & (g <= 1)])
    target = distinct_repeats(g)[:, None]
    inputs = (np.full_like(target, SATURATED), target, np.ones_like(target))
    for momentum in (0.0, 0.75):
        ours, theirs = GHMC(bins=bins, momentum=momentum), MMDetGHMC(bins=bins, momentum=momentum)
        for reduction in ("none", "mean"):
            compare(ours, theirs, inputs, reduction_override=reduction, what=reduction)


@pytest.mark.parametrize("bins", [2, 10, 30])
def test_ghmc_binary_targets_at_one_half_and_the_extremes(bins):
    """Binary targets: sigmoid(0) = 0.5 exactly (an edge for even bins), and
    saturated logits give g = 0 and g = 1 exactly."""
    pred = np.array([[0.0], [0.0], [SATURATED], [-SATURATED], [SATURATED], [-SATURATED], [0.0]],
                    dtype=np.float32)
    target = np.array([[0], [1], [0], [1], [1], [0], [1]], dtype=np.float32)
    inputs = (pred, target, np.ones_like(target))
    for momentum in (0.0, 0.75):
        ours, theirs = GHMC(bins=bins, momentum=momentum), MMDetGHMC(bins=bins, momentum=momentum)
        for reduction in ("none", "mean"):
            got, _ = compare(ours, theirs, inputs, reduction_override=reduction, what=reduction)
            assert np.isfinite(got).all()


@pytest.mark.parametrize("bins", [1, 3, 10, 30])
def test_ghmr_gradient_norms_on_every_edge(bins):
    """g on each inner edge and its float32 neighbours, plus 0 and 1 (the
    last edge is 1e3, out of reach), wherever both libraries compute that g
    from the same delta."""
    mu = 0.02
    inner = edges_f32(bins)[1:-1]
    wanted = np.unique(np.concatenate([[0.0, 1.0], with_neighbours(inner)]).astype(np.float32))
    found = ghmr_deltas_hitting(wanted, mu)
    # About a third of these values have no delta that both libraries map to
    # them; the rest, 0 and 1 among them, still cover every region. The
    # bucketing itself is exercised on every edge by the GHM-C test above and
    # by test_region_ids_match_mmdets_comparisons.
    assert 0.0 in found and 1.0 in found
    assert len(found) >= 0.6 * len(wanted), (len(found), len(wanted))
    deltas = distinct_repeats(np.array(list(found.values()), np.float32))
    pred = np.stack([deltas, -deltas, deltas, -deltas], axis=1)
    inputs = (pred, np.zeros_like(pred), np.ones_like(pred))
    for momentum in (0.0, 0.7):
        options = dict(mu=mu, bins=bins, momentum=momentum)
        ours, theirs = GHMR(**options), MMDetGHMR(**options)
        for reduction in ("none", "mean"):
            compare(ours, theirs, inputs, reduction_override=reduction, what=reduction)


@pytest.mark.parametrize("loss_class, mmdet_class", [(GHMC, MMDetGHMC), (GHMR, MMDetGHMR)])
def test_region_ids_match_mmdets_comparisons(loss_class, mmdet_class):
    """The bucketing alone (a private method), on every float32 within three
    ulps of every k / bins, for every bin count up to 64 and 100: each id is
    the region mmdet's ``edges[i] <= g < edges[i + 1]`` picks, whichever of
    the fast (truncation) and exact (searchsorted) paths the bin count uses."""
    offsets = np.arange(-3, 4, dtype=np.int32)
    for bins in list(range(1, 65)) + [100]:
        ours = loss_class(bins=bins)
        edges = mmdet_class(bins=bins).edges.numpy()
        centres = edges_f32(bins)
        g = (centres.view(np.int32)[:, None] + offsets).view(np.float32).ravel()
        g = np.unique(g[(g >= 0) & (g <= 1)])
        want = np.searchsorted(edges, g, side="right") - 1
        with paddle.no_grad():
            ids = ours._region_ids(paddle.to_tensor(g), paddle.to_tensor(True)).numpy()
        # Id ``bins`` is the fast path's alias of the last region.
        got = np.where(ids == bins, bins - 1, ids)
        assert np.array_equal(got, want), (bins, g[got != want], got[got != want], want[got != want])


@pytest.mark.parametrize("last_edge", [None, 1e3], ids=["ghmc", "ghmr"])
def test_byte_regions_match_mmdets_comparisons(last_edge):
    """The bucketing of the chunked passes (scale, exclusion, histogram, cast to
    bytes) on every float32 within three ulps of every k / bins, for every bin
    count up to 64 and 100 where it applies: each id and count is what mmdet's
    ``edges[i] <= g < edges[i + 1]`` gives, for both ways of excluding the
    invalid elements (per-sample factors and a full-size mask), with NaN and
    invalid elements in no region and, unbounded, g > 1 too."""
    offsets = np.arange(-3, 4, dtype=np.int32)
    checked = 0
    for bins in list(range(1, 65)) + [100]:
        edges = bin_edges(bins, last_edge)
        if not (truncation_is_exact(edges, bins) and byte_regions_apply(bins, paddle.float32)):
            continue
        checked += 1
        centres = edges_f32(bins)
        g = (centres.view(np.int32)[:, None] + offsets).view(np.float32).ravel()
        g = np.unique(g[(g >= 0) & (g <= 1)])
        bounded = last_edge is not None
        # Unbounded norms from (bins + 1) / bins up are in no region; below
        # that the documented deviation (the last region) applies.
        extra = [np.nan] + ([] if bounded else [2.5, 40.0, 1e30])
        g = np.concatenate([g, np.float32(extra)]).astype(np.float32)
        valid = np.arange(g.size) % 5 != 3
        want = np.searchsorted(edges, g, side="right") - 1
        want = np.where(valid & (want >= 0) & (want < bins), want, -1)
        column = paddle.to_tensor(valid.reshape(-1, 1))
        for broadcasts, shaped in ((True, column), (False, column.reshape([-1]))):
            norms = paddle.to_tensor(g.reshape(-1, 1) if broadcasts else g)
            ids, counts = byte_regions(norms, exclusion(shaped, broadcasts, bins), bins, bounded)
            ids = ids.numpy().reshape(-1).astype(np.int64)
            counts = counts.numpy()
            # Id ``bins`` is the alias of the last region; ``bins + 1`` excluded.
            got = np.where(ids == bins, bins - 1, ids)
            got = np.where((ids == bins + 1) | np.isnan(g), -1, got)
            assert np.array_equal(got, want), (bins, broadcasts, g[got != want], got[got != want])
            assert ids.max() < BYTE_TABLE_SIZE
            region_counts = counts[:bins].copy()
            region_counts[bins - 1] += counts[bins]
            assert np.array_equal(region_counts, np.bincount(want[want >= 0], minlength=bins)), bins
    assert checked >= 20


# ------------------------------------------------------ special populations


def test_all_label_weights_zero():
    rng = np.random.default_rng(1)
    pred, labels, _ = classification_inputs(rng, 12, 5)
    inputs = (pred, labels, np.zeros(12, np.float32))
    for momentum in (0.0, 0.75):
        ours, theirs = GHMC(bins=30, momentum=momentum), MMDetGHMC(bins=30, momentum=momentum)
        for reduction in ("mean", "none"):
            got, _ = compare(ours, theirs, inputs, reduction_override=reduction)
            assert not got.any()
        if momentum > 0:
            assert not ours.acc_sum.numpy().any()
    box_pred, box_target, _ = regression_inputs(rng, 12)
    got, _ = compare(GHMR(momentum=0.7), MMDetGHMR(momentum=0.7),
                          (box_pred, box_target, np.zeros_like(box_pred)))
    assert got == 0


def test_ghmr_tot_is_the_weight_sum_at_least_one():
    """GHM-R's tot is the sum of the box weights, clamped at 1: fractional
    weights change it where a count of valid elements would not."""
    rng = np.random.default_rng(14)
    pred, target, _ = regression_inputs(rng, 6)
    for weight_value in (0.05, 0.3, 0.7, 3.0):
        weights = np.zeros_like(pred)
        weights[:2, :2] = weight_value
        for momentum in (0.0, 0.7):
            compare(GHMR(momentum=momentum), MMDetGHMR(momentum=momentum),
                    (pred, target, weights), what=f"weights {weight_value}")


def test_all_valid_and_no_positives():
    rng = np.random.default_rng(2)
    pred, labels, _ = classification_inputs(rng, 20, 4, pos_rate=0.0)
    assert (labels == 4).all()
    compare(GHMC(bins=30, momentum=0.75), MMDetGHMC(bins=30, momentum=0.75),
                 (pred, labels, np.ones(20, np.float32)))


def test_a_single_region_populated():
    inputs = (np.zeros((6, 3), np.float32), np.full(6, 3, np.int64), np.ones(6, np.float32))
    ours, theirs = GHMC(bins=7, momentum=0.75), MMDetGHMC(bins=7, momentum=0.75)
    for call in range(3):
        compare(ours, theirs, inputs, what=f"call {call}")
    assert np.count_nonzero(ours.acc_sum.numpy()) == 1


@pytest.mark.parametrize("bins", [10, 30])
def test_every_region_populated(bins):
    centres = (np.arange(bins, dtype=np.float32) + np.float32(0.5)) / np.float32(bins)
    target = distinct_repeats(centres)[:, None]
    inputs = (np.full_like(target, SATURATED), target, np.ones_like(target))
    ours, theirs = GHMC(bins=bins, momentum=0.75), MMDetGHMC(bins=bins, momentum=0.75)
    compare(ours, theirs, inputs)
    assert np.count_nonzero(ours.acc_sum.numpy()) == bins


def test_index_and_one_hot_targets_agree():
    rng = np.random.default_rng(3)
    pred, labels, weights = classification_inputs(rng, 30, 6, pos_rate=0.4, ignore_rate=0.2)
    labels[:3] = -1  # out-of-range indices are background too, as in mmdet
    onehot = (labels[:, None] == np.arange(6)[None, :]).astype(np.float32)
    full_weights = np.repeat(weights[:, None], 6, axis=1)
    for reduction in ("mean", "none"):
        from_index, _ = compare(GHMC(bins=30), MMDetGHMC(bins=30), (pred, labels, weights),
                                     reduction_override=reduction)
        from_onehot, _ = compare(GHMC(bins=30), MMDetGHMC(bins=30),
                                      (pred, onehot, full_weights), reduction_override=reduction)
        # Ours computes the same float32 operations either way.
        assert np.array_equal(from_index, from_onehot)


def test_nan_predictions_are_in_no_region():
    rng = np.random.default_rng(4)
    pred, labels, weights = classification_inputs(rng, 10, 3, ignore_rate=0.0)
    pred[2, 1] = np.nan
    ours, theirs = GHMC(bins=10, momentum=0.75), MMDetGHMC(bins=10, momentum=0.75)
    got, want = run_both(ours, theirs, (pred, labels, weights))
    assert np.isnan(got) and np.isnan(want)
    assert_same_state(ours, theirs)
    box_pred, box_target, box_weights = regression_inputs(rng, 10, pos_rate=1.0)
    box_pred[0, 0] = np.inf  # g = inf / inf = NaN
    ours, theirs = GHMR(momentum=0.7), MMDetGHMR(momentum=0.7)
    run_both(ours, theirs, (box_pred, box_target, box_weights))
    assert_same_state(ours, theirs)


def test_finite_where_mmdets_is():
    """Saturated logits and huge deltas: both finite and equal."""
    pred = np.array([[80.0, -80.0, 30.0], [-30.0, 0.0, 17.0]], np.float32)
    for labels in (np.array([0, 3]), np.array([3, 1])):
        got, want = compare(GHMC(bins=30), MMDetGHMC(bins=30),
                                 (pred, labels, np.ones(2, np.float32)))
        assert np.isfinite(want) and np.isfinite(got)
    deltas = np.array([[1e4, -1e4, 1e-8, 0.0]], np.float32)
    got, want = compare(GHMR(), MMDetGHMR(), (deltas, np.zeros_like(deltas), np.ones_like(deltas)))
    assert np.isfinite(want) and np.isfinite(got)


# ----------------------------------------------------- momentum sequences


def test_ghmc_momentum_over_consecutive_calls():
    """25 calls: five 'levels' of different sizes per 'iteration', one buffer.

    These inputs keep every logit within [-9, 7], so the BCE rounding stays
    far below the 1e-6 relative agreement asked of each call's loss.
    """
    rng = np.random.default_rng(5)
    ours, theirs = GHMC(bins=30, momentum=0.75), MMDetGHMC(bins=30, momentum=0.75)
    for call in range(25):
        n = [160, 80, 40, 20, 10][call % 5]
        inputs = classification_inputs(rng, n, 8, pos_rate=0.05, ignore_rate=0.05, scale=2.0)
        inputs = (np.clip(inputs[0], -9, 7),) + inputs[1:]
        got, want = compare(ours, theirs, inputs, what=f"call {call}")
        assert_within(got, want, atol=0.0, what=f"call {call}: loss")


def test_ghmr_momentum_over_consecutive_calls():
    rng = np.random.default_rng(6)
    ours, theirs = GHMR(mu=0.02, bins=10, momentum=0.7), MMDetGHMR(mu=0.02, bins=10, momentum=0.7)
    for call in range(25):
        n = [120, 60, 30, 16, 8][call % 5]
        compare(ours, theirs, regression_inputs(rng, n, pos_rate=0.2), what=f"call {call}")


# ------------------------------------------------ reductions, loss_weight


def test_reductions_and_loss_weight():
    rng = np.random.default_rng(8)
    cls_inputs = classification_inputs(rng, 25, 5)
    box_inputs = regression_inputs(rng, 25)
    for reduction in ("mean", "none"):
        for loss_weight in (1.0, 0.5, 10.0):
            compare(GHMC(bins=10, loss_weight=loss_weight, reduction=reduction),
                         MMDetGHMC(bins=10, loss_weight=loss_weight, reduction=reduction),
                         cls_inputs, what=f"GHMC {reduction} x{loss_weight}")
            compare(GHMR(loss_weight=loss_weight, reduction=reduction),
                         MMDetGHMR(loss_weight=loss_weight, reduction=reduction),
                         box_inputs, what=f"GHMR {reduction} x{loss_weight}")
    # reduction_override wins over the constructor's reduction.
    got, want = compare(GHMC(bins=10, reduction="none"), MMDetGHMC(bins=10, reduction="none"),
                             cls_inputs, reduction_override="mean")
    assert got.shape == () and want.shape == ()


def test_sum_reduction_is_rejected_like_mmdet():
    rng = np.random.default_rng(9)
    cls_inputs = classification_inputs(rng, 5, 3)
    box_inputs = regression_inputs(rng, 5)
    for ours, theirs, inputs in ((GHMC(), MMDetGHMC(), cls_inputs),
                                 (GHMR(), MMDetGHMR(), box_inputs)):
        with pytest.raises(ValueError):
            theirs(*[_torch(a) for a in inputs], reduction_override="sum")
        with pytest.raises(ValueError):
            ours(*[_paddle(a) for a in inputs], reduction_override="sum")
    with pytest.raises(ValueError):
        GHMC(reduction="sum")(*[_paddle(a) for a in cls_inputs])


def test_avg_factor_is_ignored():
    rng = np.random.default_rng(10)
    cls_inputs = classification_inputs(rng, 20, 4)
    box_inputs = regression_inputs(rng, 20)
    got, want = run_both(GHMC(), MMDetGHMC(), cls_inputs, avg_factor=123.0)
    assert got == GHMC()(*[_paddle(a) for a in cls_inputs]).numpy()
    assert want == MMDetGHMC()(*[_torch(a) for a in cls_inputs]).detach().numpy()
    got, want = run_both(GHMR(), MMDetGHMR(), box_inputs, avg_factor=7.0)
    assert got == GHMR()(*[_paddle(a) for a in box_inputs]).numpy()
    assert_within(got, want, atol=0.0)


# --------------------------------------------------------------- gradients


def gradients(ours, theirs, inputs):
    """d(sum(output * r))/d pred on both sides, r fixed and random."""
    pred, *rest = inputs
    tp, pp = _torch(pred, grad=True), _paddle(pred, grad=True)
    t_out = theirs(tp, *[_torch(a) for a in rest])
    p_out = ours(pp, *[_paddle(a) for a in rest])
    upstream = np.random.default_rng(7).random(tuple(t_out.shape)).astype(np.float32)
    (t_out * _torch(upstream)).sum().backward()
    (p_out * _paddle(upstream)).sum().backward()
    return pp.grad.numpy(), tp.grad.numpy(), upstream


# Per loss: the two modules' options, the inputs and how many ulps (of a
# value at most 1 in magnitude) each element's d loss / d pred may differ by.
# GHM-C: sigmoid(x) - t, and the two sigmoids may differ by an ulp of 1, i.e.
# eps. GHM-R: d / sqrt(d*d + mu*mu) through each library's sqrt and, for
# torch, its chain rule: a few ulps.
GRADIENT_CASES = [
    pytest.param(GHMC, MMDetGHMC, dict(bins=30, momentum=0.75, loss_weight=2.0),
                 lambda: classification_inputs(np.random.default_rng(11), 30, 6,
                                               pos_rate=0.3, ignore_rate=0.2),
                 2, id="ghmc"),
    pytest.param(GHMR, MMDetGHMR, dict(mu=0.02, bins=10, momentum=0.7, loss_weight=10.0),
                 lambda: regression_inputs(np.random.default_rng(12), 30, pos_rate=0.5),
                 4, id="ghmr"),
]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss_class, mmdet_class, options, make_inputs, ulps", GRADIENT_CASES)
def test_gradient_matches_torch_autograd(loss_class, mmdet_class, options, make_inputs, ulps,
                                         reduction):
    inputs = make_inputs()
    options = dict(options, reduction=reduction)
    ours, theirs = loss_class(**options), mmdet_class(**options)
    for call in range(2):
        weights = mmdet_weights(theirs, inputs)
        got, want, upstream = gradients(ours, theirs, inputs)
        scale = weights * options["loss_weight"] * upstream
        if reduction == "mean":
            scale = scale / normaliser(theirs, inputs)
        assert_within(got, want, atol=ulps * EPS32 * scale, rtol=1e-5,
                      what=f"call {call}: gradient")
        assert_same_state(ours, theirs)


# -------------------------------------------------------------- state dict


def test_acc_sum_state_dict_round_trip(tmp_path):
    rng = np.random.default_rng(13)
    ours, theirs = GHMC(bins=30, momentum=0.75), MMDetGHMC(bins=30, momentum=0.75)
    for _ in range(4):
        run_both(ours, theirs, classification_inputs(rng, 40, 5))
    saved = tmp_path / "ghmc.pdparams"
    paddle.save(ours.state_dict(), str(saved))

    restored = GHMC(bins=30, momentum=0.75)
    restored.set_state_dict(paddle.load(str(saved)))
    assert np.array_equal(restored.acc_sum.numpy(), ours.acc_sum.numpy())

    # mmdet's buffers load into ours the same way (as a converted checkpoint would).
    from_torch = GHMC(bins=30, momentum=0.75)
    from_torch.set_state_dict({k: paddle.to_tensor(v.numpy()) for k, v in theirs.state_dict().items()})
    assert np.array_equal(from_torch.acc_sum.numpy(), theirs.acc_sum.numpy())

    # All of them continue as the original modules do.
    inputs = classification_inputs(rng, 40, 5)
    got, want = run_both(ours, theirs, inputs)
    for other in (restored, from_torch):
        assert other(*[_paddle(a) for a in inputs]).numpy() == got
        assert np.array_equal(other.acc_sum.numpy(), ours.acc_sum.numpy())
    assert_same_state(ours, theirs)


def state_layout(state_dict) -> list:
    """(name, shape, dtype) of each entry, in order, for a Paddle or a torch state dict."""
    return [(name, list(value.shape), str(np.asarray(value.numpy()).dtype))
            for name, value in state_dict.items()]


@pytest.mark.parametrize("momentum", [0, 0.75])
@pytest.mark.parametrize("loss_class, mmdet_class", [(GHMC, MMDetGHMC), (GHMR, MMDetGHMR)])
def test_state_dict_layout_is_mmdets(loss_class, mmdet_class, momentum):
    """Names, order, shapes and dtypes; ``acc_sum`` exists only with momentum,
    before and after a call."""
    ours, theirs = loss_class(bins=30, momentum=momentum), mmdet_class(bins=30, momentum=momentum)
    want = [("edges", [31], "float32")] + ([("acc_sum", [30], "float32")] if momentum else [])
    assert state_layout(theirs.state_dict()) == want
    assert state_layout(ours.state_dict()) == want
    assert hasattr(ours, "acc_sum") == hasattr(theirs, "acc_sum") == bool(momentum)
    rng = np.random.default_rng(30)
    inputs = (classification_inputs(rng, 20, 4) if loss_class is GHMC
              else regression_inputs(rng, 20, pos_rate=0.5))
    compare(ours, theirs, inputs)
    assert state_layout(ours.state_dict()) == state_layout(theirs.state_dict()) == want


# ------------------------------------------------- the per-region weight bug


def scalar_weight_variant(pred, target, label_weight, bins):
    """The known bug: ``weights = tot / num_in_bin`` assigned to the whole
    tensor (so the last non-empty region's weight applies to every element)
    instead of to the region's elements only."""
    edges = edges_f32(bins)
    edges[-1] += np.float32(1e-6)
    g = np.abs(1.0 / (1.0 + np.exp(-pred.astype(np.float64))) - target)
    valid = label_weight > 0
    tot = max(valid.sum(), 1.0)
    weights, n = 0.0, 0
    for i in range(bins):
        num_in_bin = ((g >= edges[i]) & (g < edges[i + 1]) & valid).sum()
        if num_in_bin > 0:
            weights = tot / num_in_bin
            n += 1
    if n > 0:
        weights = weights / n
    bce = np.maximum(pred, 0) - pred * target + np.log1p(np.exp(-np.abs(pred)))
    return float((bce * weights).sum() / tot)


def test_per_region_weights_catch_the_scalar_weight_bug():
    # Nine easy negatives (g = sigmoid(-3), about 0.05) and one element at
    # g = 0.5: two regions with different counts, so no single weight can be
    # right for both.
    pred = np.array([[-3.0]] * 9 + [[0.0]], np.float32)
    target = np.zeros_like(pred)
    inputs = (pred, target, np.ones_like(pred))
    got, want = compare(GHMC(bins=30), MMDetGHMC(bins=30), inputs)
    buggy = scalar_weight_variant(*inputs, bins=30)
    assert abs(buggy - float(want)) > 0.1 * abs(float(want))
    assert abs(float(got) - float(want)) <= 1e-6 * abs(float(want))


# ------------------------------------------- fidelity at the input edges


def test_confident_logits_keep_their_small_losses():
    """BCE of confident logits: as close to the float64 value as torch's (softplus(x) - t*x gives 0)."""
    pred = np.array([[17.0, -17.0, 10.0, -10.0, 25.0, -25.0, 0.5, -3.0]], np.float32)
    for target in (np.ones_like(pred), np.zeros_like(pred)):
        x, t = pred.astype(np.float64), target.astype(np.float64)
        truth = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
        bce_torch = torch.nn.functional.binary_cross_entropy_with_logits(
            _torch(pred), _torch(target), reduction="none").numpy().astype(np.float64)
        ours = GHMC(bins=30)
        # 'none' gives weight * loss; divide the weights out to see the element-wise loss.
        weights = our_weights(ours, (pred, target, np.ones_like(pred)))
        got = ours(_paddle(pred), _paddle(target), _paddle(np.ones_like(pred)),
                   reduction_override="none").numpy().astype(np.float64) / weights
        torch_error = np.abs(bce_torch - truth) / truth
        our_error = np.abs(got - truth) / truth
        assert (our_error <= np.maximum(torch_error, 2 * EPS32)).all(), (got, bce_torch, truth)
        if target.all():
            # The figures of the fault: pred 17 is 4.14e-8 (not 0), pred 10 is 4.5399e-5 (not 4.5776e-5).
            assert got[0, 0] == pytest.approx(4.139937718785167e-08, rel=1e-6)
            assert got[0, 2] == pytest.approx(4.539889921682063e-05, rel=1e-6)


def test_mismatched_ghmc_shapes_are_named():
    """A float target (N, 1) for (N, C) logits: mmdet raises (BCE sizes); so do we, naming both shapes."""
    rng = np.random.default_rng(21)
    pred = rng.standard_normal((6, 4)).astype(np.float32)
    column = (rng.random((6, 1)) > 0.5).astype(np.float32)
    with pytest.raises(Exception):
        MMDetGHMC(bins=30)(_torch(pred), _torch(column), _torch(np.ones((6, 4), np.float32)))
    with pytest.raises(ValueError, match=r"target \[6, 1\] must have the shape of pred \[6, 4\]"):
        GHMC(bins=30)(_paddle(pred), _paddle(column), _paddle(np.ones((6, 4), np.float32)))
    with pytest.raises(ValueError, match=r"pred \[2, 3, 4\] and target \[2\]"):
        GHMC(bins=30)(_paddle(pred.reshape(2, 3, 4)), _paddle(np.array([0, 1])), _paddle(np.ones(2, np.float32)))
    with pytest.raises(ValueError, match=r"label_weight \[5\] does not broadcast to pred \[6, 4\]"):
        GHMC(bins=30)(_paddle(pred), _paddle(np.zeros_like(pred)), _paddle(np.ones(5, np.float32)))


@pytest.mark.parametrize("shape", [(40,), (3, 5, 4), (2, 3, 4, 5)])
def test_ghmc_elementwise_targets_of_any_rank_match_mmdet(shape):
    rng = np.random.default_rng(22)
    pred = (3 * rng.standard_normal(shape)).astype(np.float32)
    target = (rng.random(shape) < 0.2).astype(np.float32)
    weights = (rng.random(shape) > 0.1).astype(np.float32)
    ours, theirs = GHMC(bins=30, momentum=0.75), MMDetGHMC(bins=30, momentum=0.75)
    for _ in range(2):
        got, want = run_both(ours, theirs, (pred, target, weights))
        assert got == pytest.approx(want, rel=1e-5)
        assert_same_state(ours, theirs)


@pytest.mark.parametrize("weight_shape", [(6, 1), (1, 4), ()])
def test_broadcast_label_weight_counts_as_mmdet_does(weight_shape):
    """``tot`` counts the label weights as given, not after broadcasting (mmdet's rule)."""
    rng = np.random.default_rng(23)
    pred = (2 * rng.standard_normal((6, 4))).astype(np.float32)
    target = (rng.random((6, 4)) < 0.3).astype(np.float32)
    weights = np.asarray(rng.random(weight_shape) > 0.2, np.float32)
    if not weights.any():
        weights = np.ones(weight_shape, np.float32)
    ours, theirs = GHMC(bins=30, momentum=0.75), MMDetGHMC(bins=30, momentum=0.75)
    # 'mean' divides tot out again; the element-wise weights show it.
    for reduction in ("none", "mean", "none"):
        got, want = run_both(ours, theirs, (pred, target, weights), reduction_override=reduction)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=str(weight_shape))
        assert_same_state(ours, theirs)


@pytest.mark.parametrize("value", [np.inf, -np.inf, 1e20, -3e19])
def test_ghmr_infinite_prediction_agrees_with_mmdet(value):
    """Paddle's vectorized float32 sqrt(+inf) is NaN; the loss must still be what mmdet gives.

    A delta whose square overflows (1e20) has g = 0 and an infinite loss in
    mmdet, hence an infinite mean; an infinite delta has g = NaN (no region).
    """
    rng = np.random.default_rng(24)
    pred, target, weights = regression_inputs(rng, 16, pos_rate=1.0)
    pred[3, 2] = value
    for reduction in ("mean", "none"):
        ours, theirs = GHMR(momentum=0.7), MMDetGHMR(momentum=0.7)
        got, want = run_both(ours, theirs, (pred, target, weights), reduction_override=reduction)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-7)
        assert_same_state(ours, theirs)


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_ghmr_infinite_difference_is_weighted_by_zero(value):
    """An infinite or NaN delta has g = NaN, in no region: mmdet weights its
    loss (inf or NaN) by zero, which gives NaN, whatever the weight of the
    region a byte id would point to. Here every region, 0 among them (g = 0
    from deltas of 0), is populated."""
    rng = np.random.default_rng(25)
    pred, target, weights = regression_inputs(rng, 40, pos_rate=1.0)
    pred[:8] = target[:8]
    pred[9, 1] = value
    for reduction in ("mean", "none"):
        ours, theirs = GHMR(momentum=0.7), MMDetGHMR(momentum=0.7)
        got, want = run_both(ours, theirs, (pred, target, weights), reduction_override=reduction)
        assert np.isnan(want).any()
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        assert_same_state(ours, theirs)


# ------------------------------------------------------------ input dtypes


FLOAT_DTYPES = ("float32", "float64")
WEIGHT_DTYPES = ("float32", "float64", "int64", "bool")
DTYPE_CASES = (
    [("ghmc", p, t, w) for p in FLOAT_DTYPES for t in FLOAT_DTYPES + ("int64", "bool")
     for w in WEIGHT_DTYPES]
    + [("ghmc-index", p, t, w) for p in FLOAT_DTYPES for t in ("int32", "int64")
       for w in WEIGHT_DTYPES]
    + [("ghmr", p, t, w) for p in FLOAT_DTYPES for t in FLOAT_DTYPES + ("int64",)
       for w in WEIGHT_DTYPES])


def dtype_case(kind, pred_dtype, target_dtype, weight_dtype):
    """Both modules (with momentum), the inputs in the given dtypes and the
    gradient's ulp bound (see GRADIENT_CASES)."""
    rng = np.random.default_rng(31)
    if kind == "ghmr":
        pred, target, weights = regression_inputs(rng, 24, pos_rate=0.5)
        if target_dtype == "int64":
            target = np.round(3 * target)
        modules, ulps = (GHMR(momentum=0.7), MMDetGHMR(momentum=0.7)), 4
    else:
        pred, target, weights = classification_inputs(rng, 24, 5, pos_rate=0.3, ignore_rate=0.2,
                                                      index=kind == "ghmc-index")
        modules, ulps = (GHMC(bins=30, momentum=0.75), MMDetGHMC(bins=30, momentum=0.75)), 2
    inputs = (pred.astype(pred_dtype), target.astype(target_dtype), weights.astype(weight_dtype))
    return modules, inputs, ulps


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("kind, pred_dtype, target_dtype, weight_dtype", DTYPE_CASES)
def test_output_dtype_is_mmdets(kind, pred_dtype, target_dtype, weight_dtype, reduction):
    """The loss in mmdet's dtype (GHM-C: the prediction's, as mmdet casts the
    targets to float32; GHM-R: ``pred - target`` promoted as torch promotes),
    with mmdet's values; the gradient in the prediction's dtype, with mmdet's values."""
    (ours, theirs), inputs, ulps = dtype_case(kind, pred_dtype, target_dtype, weight_dtype)
    # The values, within the tolerances of the float32 comparisons above.
    compare(ours, theirs, inputs, reduction_override=reduction)
    pred, *rest = inputs
    tp, pp = _torch(pred, grad=True), _paddle(pred, grad=True)
    weights = mmdet_weights(theirs, inputs)
    t_out = theirs(tp, *[_torch(a) for a in rest], reduction_override=reduction)
    p_out = ours(pp, *[_paddle(a) for a in rest], reduction_override=reduction)
    want_dtype = str(t_out.detach().numpy().dtype)
    assert str(p_out.numpy().dtype) == want_dtype

    upstream = np.random.default_rng(7).random(tuple(t_out.shape)).astype(want_dtype)
    (t_out * _torch(upstream)).sum().backward()
    (p_out * _paddle(upstream)).sum().backward()
    assert str(pp.grad.numpy().dtype) == str(tp.grad.numpy().dtype) == pred_dtype
    scale = weights * theirs.loss_weight * upstream
    if reduction == "mean":
        scale = scale / normaliser(theirs, inputs)
    assert_within(pp.grad.numpy(), tp.grad.numpy(), atol=ulps * EPS32 * scale, rtol=1e-5,
                  what="gradient")
    assert_same_state(ours, theirs)



@pytest.mark.parametrize("pred_dtype, target_dtype, target_shape", [
    ("float32", "float64", ()), ("float64", "float32", ()), ("float32", "float64", (1, 4))])
def test_ghmr_target_of_fewer_dimensions_promotes_as_torch(pred_dtype, target_dtype, target_shape):
    """A 0-dim target does not widen the prediction (torch's rule); one with
    dimensions that broadcasts does."""
    rng = np.random.default_rng(32)
    pred, _, weights = regression_inputs(rng, 12, pos_rate=0.5)
    target = (0.3 * rng.standard_normal(target_shape)).astype(target_dtype)
    inputs = (pred.astype(pred_dtype), target, weights)
    for reduction in ("mean", "none"):
        got, want = compare(GHMR(momentum=0.7), MMDetGHMR(momentum=0.7), inputs,
                            reduction_override=reduction)
        assert got.dtype == want.dtype


def test_ghmc_float64_soft_targets_are_rounded_to_float32_like_mmdet():
    """mmdet's ``target.float()``: a float64 target of 0.1 becomes fl32(0.1),
    which is the first edge for 10 bins, so g lands in region 1, not 0."""
    target = np.array([[0.1]] * 3 + [[0.35]] * 2 + [[0.7]], np.float64)
    pred = np.full_like(target, SATURATED)
    inputs = (pred, target, np.ones_like(target))
    for momentum in (0.0, 0.75):
        ours, theirs = GHMC(bins=10, momentum=momentum), MMDetGHMC(bins=10, momentum=momentum)
        for reduction in ("none", "mean"):
            compare(ours, theirs, inputs, reduction_override=reduction, what=reduction)
        assert ours.last_bin_counts.numpy()[:2].tolist() == [0, 3]


def test_label_weights_are_compared_as_mmdet_compares_them():
    """A float64 weight of 1e-50 counts for GHM-R (compared in float64) but
    not for GHM-C (compared after the cast to float32, where it is zero)."""
    rng = np.random.default_rng(33)
    tiny = np.full((6, 4), 1e-50)
    cls_pred, cls_target, _ = classification_inputs(rng, 6, 4, index=False)
    box_pred, box_target, _ = regression_inputs(rng, 6)
    for reduction in ("none", "mean"):
        got, _ = compare(GHMC(bins=10), MMDetGHMC(bins=10), (cls_pred, cls_target, tiny),
                         reduction_override=reduction)
        assert not got.any()
        got, _ = compare(GHMR(), MMDetGHMR(), (box_pred, box_target, tiny),
                         reduction_override=reduction)
        assert got.all()


@pytest.mark.parametrize("loss_class, mmdet_class, target, message", [
    (GHMC, MMDetGHMC, np.array([0, 2, 4, 1, 4, 3], np.float32), "int32 or int64, got paddle.float32"),
    (GHMC, MMDetGHMC, np.array([0, 2, 4, 1, 4, 3], np.float64), "int32 or int64, got paddle.float64"),
    (GHMC, MMDetGHMC, np.array([0, 1, 0, 1, 1, 0], bool), "int32 or int64, got paddle.bool"),
    (GHMC, MMDetGHMC, np.array([0, 2, 4, 1, 4, 3], np.uint8), "int32 or int64, got paddle.uint8"),
    (GHMC, MMDetGHMC, np.array([0, 2, 4, 1, 4, 3], np.int8), "int32 or int64, got paddle.int8"),
    (GHMR, MMDetGHMR, np.zeros((6, 4), bool), "paddle.bool targets from paddle.float32 pred"),
])
def test_target_dtypes_mmdet_rejects_are_named(loss_class, mmdet_class, target, message):
    """Index targets torch cannot index with, a bool GHM-R target torch cannot subtract."""
    pred = np.random.default_rng(34).standard_normal((6, 4)).astype(np.float32)
    weights = np.ones(target.shape, np.float32)
    with pytest.raises((IndexError, RuntimeError)):
        mmdet_class()(_torch(pred), _torch(target), _torch(weights))
    with pytest.raises(ValueError, match=message):
        loss_class()(_paddle(pred), _paddle(target), _paddle(weights))


@pytest.mark.parametrize("loss_class", [GHMC, GHMR])
def test_predictions_other_than_float32_or_float64_are_named(loss_class):
    pred = paddle.zeros([6, 4], dtype="float16")
    with pytest.raises(ValueError, match="float32 or float64, got paddle.float16"):
        loss_class()(pred, paddle.zeros([6, 4], dtype="float16"), paddle.ones([6, 4]))


# ---------------------------------------------- chunks of the first axis, threads


def use_small_chunks(monkeypatch, align: int = 1):
    """Chunks of a few rows on two threads, so that small inputs take the path
    the reference scale takes (several chunks, the thread pool)."""
    monkeypatch.setattr(ghm_chunks, "CHUNK_ELEMENTS", 24)
    monkeypatch.setattr(ghm_chunks, "THREADED_ELEMENTS", 1)
    monkeypatch.setattr(ghm_chunks, "ALIGN_ELEMENTS", align)
    ghm_chunks.set_threads(2)


@pytest.fixture
def small_chunks(monkeypatch):
    """`use_small_chunks` with chunks of any row count (their values may differ
    from the whole tensor's by an ulp, see `ghm_chunks`)."""
    use_small_chunks(monkeypatch)
    yield
    ghm_chunks.set_threads(None)


def test_spans_cover_the_rows_once_in_aligned_chunks():
    assert ghm_chunks.spans([]) == [None]
    assert ghm_chunks.spans([0, 80]) == [None]
    assert ghm_chunks.spans([10, 80], whole=True) == [None]
    align = ghm_chunks.ALIGN_ELEMENTS
    for shape in ([1, 3], [7], [302400, 80], [5544, 4], [3, 5, 4], [2 ** 20 + 3], [99991, 7]):
        spans = ghm_chunks.spans(shape)
        rows = [r for start, stop in spans for r in range(start, stop)]
        assert rows == list(range(shape[0])), shape
        width = math.prod(shape[1:])
        assert all((stop - start) * width <= ghm_chunks.CHUNK_ELEMENTS + align * width for start, stop in spans)
        assert all((stop - start) * width % align == 0 for start, stop in spans[:-1]), shape


def test_only_large_calls_on_the_cpu_are_threaded():
    ghm_chunks.set_threads(2)
    try:
        assert ghm_chunks.threaded(ghm_chunks.THREADED_ELEMENTS, on_cpu=True)
        assert not ghm_chunks.threaded(ghm_chunks.THREADED_ELEMENTS - 1, on_cpu=True)
        assert not ghm_chunks.threaded(ghm_chunks.THREADED_ELEMENTS, on_cpu=False)
    finally:
        ghm_chunks.set_threads(None)
    ghm_chunks.set_threads(1)
    try:
        assert not ghm_chunks.threaded(ghm_chunks.THREADED_ELEMENTS, on_cpu=True)
    finally:
        ghm_chunks.set_threads(None)


def test_chunks_run_on_the_pool_in_order(small_chunks):
    import threading

    seen = []
    out = ghm_chunks.run(lambda i: seen.append(threading.current_thread().name) or i * i, list(range(8)),
                         parallel=True)
    assert out == [i * i for i in range(8)]
    assert all(name.startswith("ghm-chunks") for name in seen)


def test_threads_setting():
    assert ghm_chunks.threads() == ghm_chunks.default_threads()
    ghm_chunks.set_threads(3)
    try:
        assert ghm_chunks.threads() == 3
        assert ghm_chunks.run(lambda i: i * i, [1, 2, 3], parallel=True) == [1, 4, 9]
    finally:
        ghm_chunks.set_threads(None)
    with pytest.raises(ValueError, match="positive"):
        ghm_chunks.set_threads(0)


@pytest.mark.parametrize("index", [True, False])
def test_chunked_ghmc_matches_mmdet(small_chunks, index):
    rng = np.random.default_rng(40)
    for momentum in (0.0, 0.75):
        ours, theirs = GHMC(bins=30, momentum=momentum), MMDetGHMC(bins=30, momentum=momentum)
        for call in range(3):
            inputs = classification_inputs(rng, 37, 6, pos_rate=0.3, ignore_rate=0.2, index=index)
            for reduction in ("mean", "none"):
                compare(ours, theirs, inputs, reduction_override=reduction, what=f"call {call}")


def test_chunked_ghmr_matches_mmdet(small_chunks):
    rng = np.random.default_rng(41)
    ours, theirs = GHMR(momentum=0.7), MMDetGHMR(momentum=0.7)
    for call in range(3):
        inputs = regression_inputs(rng, 29, pos_rate=0.5)
        for reduction in ("mean", "none"):
            compare(ours, theirs, inputs, reduction_override=reduction, what=f"call {call}")


@pytest.mark.parametrize("shape", [(40,), (3, 5, 4), (2, 3, 4, 5)])
def test_chunked_elementwise_targets_of_any_rank(small_chunks, shape):
    test_ghmc_elementwise_targets_of_any_rank_match_mmdet(shape)


@pytest.mark.parametrize("weight_shape", [(6, 1), (1, 4), ()])
def test_chunked_broadcast_label_weights(small_chunks, weight_shape):
    test_broadcast_label_weight_counts_as_mmdet_does(weight_shape)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss_class, mmdet_class, options, make_inputs, ulps", GRADIENT_CASES)
def test_chunked_gradient_matches_torch_autograd(small_chunks, loss_class, mmdet_class, options, make_inputs,
                                                 ulps, reduction):
    test_gradient_matches_torch_autograd(loss_class, mmdet_class, options, make_inputs, ulps, reduction)


def test_chunked_nan_and_infinite_predictions(small_chunks):
    test_nan_predictions_are_in_no_region()
    for value in (np.inf, 1e20):
        test_ghmr_infinite_prediction_agrees_with_mmdet(value)
    for value in (np.inf, np.nan):
        test_ghmr_infinite_difference_is_weighted_by_zero(value)


def _one_call(layer, inputs, reduction):
    """Output, gradient and state of one call with a gradient."""
    pred, *rest = inputs
    pp = _paddle(pred, grad=True)
    out = layer(pp, *[_paddle(a) for a in rest], reduction_override=reduction)
    out.sum().backward()
    state = layer.acc_sum.numpy() if layer.momentum > 0 else None
    return out.numpy(), pp.grad.numpy(), state, layer.last_bin_counts.numpy()


@pytest.mark.parametrize("make", [
    lambda: (GHMC(bins=30, momentum=0.75), classification_inputs(np.random.default_rng(42), 301, 8)),
    lambda: (GHMC(bins=10), classification_inputs(np.random.default_rng(43), 301, 8, index=False)),
    lambda: (GHMR(momentum=0.7), regression_inputs(np.random.default_rng(44), 301)),
], ids=["ghmc-index", "ghmc-one-hot", "ghmr"])
def test_chunks_and_threads_give_the_values_of_one_chunk(monkeypatch, make):
    """Aligned chunks on two threads: element-wise outputs, gradients, counts
    and acc_sum bit for bit; the mean's rows are summed alike, only the sum
    of the row sums may round differently. The whole call is the chunked
    path's too: that is the path the chunks split."""
    monkeypatch.setattr(ghm_host, "applies", lambda *args: False)
    whole = {}
    for reduction in ("none", "mean"):
        layer, inputs = make()
        whole[reduction] = _one_call(layer, inputs, reduction)
    use_small_chunks(monkeypatch, align=ghm_chunks.ALIGN_ELEMENTS)
    try:
        for reduction in ("none", "mean"):
            layer, inputs = make()
            assert len(ghm_chunks.spans(list(inputs[0].shape))) > 2
            out, grad, state, counts = _one_call(layer, inputs, reduction)
            want_out, want_grad, want_state, want_counts = whole[reduction]
            if reduction == "none":
                assert np.array_equal(out, want_out)
            else:
                assert out == pytest.approx(want_out, rel=2e-7)
            assert np.array_equal(grad, want_grad)
            assert np.array_equal(counts, want_counts)
            assert (state is None) == (want_state is None)
            if state is not None:
                assert np.array_equal(state, want_state)
    finally:
        ghm_chunks.set_threads(None)


def test_an_observed_bucketing_sees_the_whole_g_once():
    """The alignment recorders replace ``_region_ids`` on the layer to see the g
    it bins: the call then hands it the whole tensor in one call, and its
    result is the unobserved call's."""
    rng = np.random.default_rng(45)
    inputs = classification_inputs(rng, 4000, 8)
    plain, observed = GHMC(bins=30, momentum=0.75), GHMC(bins=30, momentum=0.75)
    seen = []

    def binning(g, valid):
        seen.append(g.shape)
        return GHMC._region_ids(observed, g, valid)

    observed._region_ids = binning
    for layer in (plain, observed):
        layer(*[_paddle(a) for a in inputs])
    assert seen == [[4000, 8]]
    assert np.array_equal(plain.acc_sum.numpy(), observed.acc_sum.numpy())
    assert np.array_equal(plain.last_bin_counts.numpy(), observed.last_bin_counts.numpy())
    del observed._region_ids
    got = observed(*[_paddle(a) for a in inputs], reduction_override="none").numpy()
    want = plain(*[_paddle(a) for a in inputs], reduction_override="none").numpy()
    assert np.array_equal(got, want)


# ------------------------------------------------------------ the two paths


@pytest.mark.parametrize("make, inputs", [
    (GHMC, lambda rng: classification_inputs(rng, 50, 7)),
    (GHMC, lambda rng: classification_inputs(rng, 50, 7, index=False)),
    (GHMR, lambda rng: regression_inputs(rng, 50)),
])
def test_each_path_is_the_one_taken(ghm_path, monkeypatch, make, inputs):
    """The path fixture is not vacuous: a small float32 CPU call reaches
    `ghm_host` on the host path and never on the chunked one."""
    reached = []
    for name in ("ghmc_arrays", "ghmr_arrays"):
        original = getattr(ghm_host, name)
        monkeypatch.setattr(ghm_host, name, lambda *args, _f=original: reached.append(1) or _f(*args))
    layer = make(momentum=0.75)
    pred, target, weight = (paddle.to_tensor(a) for a in inputs(np.random.default_rng(0)))
    pred.stop_gradient = False
    layer(pred, target, weight).backward()
    layer.harmonizing_weights(pred, target, weight)
    assert len(reached) == (2 if ghm_path == "host" else 0)


def test_host_path_takes_only_what_it_computes_exactly(monkeypatch):
    """float64, an observed bucketing, bin counts whose truncation is not exact
    (100), broadcast GHM-R targets and calls past one thread's share stay
    on the chunked path."""
    taken = []
    monkeypatch.setattr(ghm_host, "ghmr_arrays", lambda *args: taken.append(1))
    monkeypatch.setattr(ghm_host, "ghmc_arrays", lambda *args: taken.append(1))
    rng = np.random.default_rng(1)
    pred, target, weight = regression_inputs(rng, 20)
    GHMR()(paddle.to_tensor(pred.astype(np.float64)), paddle.to_tensor(target), paddle.to_tensor(weight))
    GHMR()(paddle.to_tensor(pred), paddle.to_tensor(target.astype(np.float64)), paddle.to_tensor(weight))
    GHMR()(paddle.to_tensor(pred), paddle.to_tensor(target[:1]), paddle.to_tensor(weight))
    GHMR(bins=100)(paddle.to_tensor(pred), paddle.to_tensor(target), paddle.to_tensor(weight))
    logits, labels, weights = classification_inputs(rng, 20, 3)
    observed = GHMC()
    observed._region_ids = lambda g, valid: GHMC._region_ids(observed, g, valid)
    observed(paddle.to_tensor(logits), paddle.to_tensor(labels), paddle.to_tensor(weights))
    monkeypatch.setattr(ghm_chunks, "THREADED_ELEMENTS", 60)
    GHMC()(paddle.to_tensor(logits), paddle.to_tensor(labels), paddle.to_tensor(weights))
    assert taken == []
