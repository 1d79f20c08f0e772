"""The forward stage of any model pair: the same input through a torch model and a Paddle model
with the same weights, every output and every leaf layer compared.

A client hands the stage a `ForwardPair`: the GHM RetinaNet (`align.ghm.forward`, the
default of ``python -m align.forward``), or any two models that functions build
(`align.pair`, ``--torch module:function --paddle module:function``). The stage does the
rest the same way for all of them:

1. with ``perturb``, noise on one Paddle parameter (the report must then name its layer);
2. the reference side: the torch model's outputs and every leaf layer's output
   (`TorchRecorder`), or, with ``cache``, the same read back from ``build_dir/cache``
   when nothing it depends on changed (`align.engine.cache`);
3. the Paddle side, every leaf layer compared as it runs (`PaddleComparer`), layer
   names through the pair's name map; the outputs diffed and logged with reprod_log;
4. with ``backward``, every parameter's gradient of the loss ``sum(output * R)`` (``R``
   seeded, the first output);
5. with ``isolate``, every leaf layer of ours on the reference's recorded input (and, with
   ``backward``, its recorded output gradient): each layer's own error, apart from what
   accumulated upstream (`align.engine.isolate`). The isolated rows then decide the
   verdict with the outputs; the accumulated ones are shown beside them.
"""
from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np

from align.engine.cache import ReferenceCache, cache_key
from align.engine.capture import PaddleComparer, TorchRecorder, perturb_parameter
from align.engine.cli import progress_bar
from align.engine.compare import TensorDiff, diff_arrays, first_failed_name, missing_row
from align.engine.isolate import (TorchCallRecorder, isolated_backward, isolated_forward, isolation_tables,
                                  peak_memory_gb, spill_store)
from align.engine.options import cache_option, fresh_option, option
from align.engine.report import Headline, StageResult
from align.engine.reprod import reprod_log_diff
from align.engine.weights import NameMap, convert_arrays, is_linear_weight
from align.ghm.pair import GhmStageOptions
from common.arguments import non_negative_float, positive_float, tensor_shape


@dataclass
class ForwardOptions(GhmStageOptions):
    # The pair: the GHM RetinaNet unless ``torch`` and ``paddle`` name two builders.
    torch: Optional[str] = option(None, "module:function building a torch model to compare instead of mmdet's "
                                        "GHM RetinaNet (with --paddle)")
    paddle: Optional[str] = option(None, "module:function building the Paddle model to compare with it")
    map: Optional[Path] = option(None, "with --torch: JSON map file: prefixes, tensors, converters, ignore, "
                                       "ignore_classes, compare_at, outputs (docs/own-model.md)", type=Path)
    carry: bool = option(True, "with --torch: the builders load equal weights themselves", flag="--no-carry")
    name: Optional[str] = option(None, "report file stem (default: forward; with --torch: pair)")
    shape: Optional[str] = option(None, "input NxCxHxW (default: 2x3x800x1344; with --torch: 2x3x224x224)",
                                  type=tensor_shape())
    inputs: Optional[Path] = option(None, "with --torch: .npz file of named inputs, passed as keyword arguments",
                                    type=Path)
    input: Optional[list] = option(None, "with --torch: a seeded named input name:dtype:shape[:low..high], e.g. "
                                         "ids:int64:2x16:0..1000 or mask:bool:2x16 (repeatable; keyword arguments)",
                                   append=True)
    positional: bool = option(False, "with --input or --inputs: pass the named inputs positionally, in their "
                                     "order, not as keyword arguments")
    dtype: str = option("float32", "with --torch: both models and the floating inputs in this dtype; float64 "
                                   "bounds the relative error by 1e-9 (default %(default)s)",
                        choices=("float32", "float64"))
    perturb: Optional[str] = option(None, "Paddle parameter to perturb, e.g. backbone.layer3.2.conv2.weight")
    perturb_scale: float = option(1e-3, "the perturbation's std over the parameter's (default %(default)s)",
                                  type=positive_float)
    rel_tol: float = option(1e-5, "bound on max|diff| / max|ref| (default %(default)s)", type=non_negative_float)
    mean_tol: float = option(1e-5, "bound on mean|diff| (default %(default)s)", type=non_negative_float)
    layers: bool = option(True, "skip the layer-by-layer capture", flag="--no-layers")
    backward: bool = option(False, "also every parameter's gradient of sum(output * R), R seeded")
    # Also every leaf layer on the reference's recorded input (its own error, float32).
    isolate: bool = option(False, "also every layer on the reference's recorded input: each layer's own error")
    spill: bool = option(False, "keep the isolated layers' recorded activations on disk, not in memory "
                                "(always for the GHM RetinaNet)")
    # Keep the reference side in ``build_dir/cache`` and take it from there when it matches (at
    # 2x3x800x1344 mmdet's layer records are 6.5 GB on disk, memory-mapped when they are used).
    cache: bool = cache_option()
    # With ``cache``: recompute the reference side even when the cache holds it.
    fresh: bool = fresh_option()


class ForwardPair(Protocol):
    """What a client hands the forward stage: two models with equal weights and their input."""

    stage: str  # the report's name
    title: str
    paddle_model: Any  # in the mode to compare (eval for inference)
    name_map: NameMap  # torch layer names -> Paddle's
    inputs: Any  # an array, or name -> array passed as keyword arguments
    meta: dict  # what the report records of the pair (checkpoint, input, weights carried...)
    spill: bool  # the isolated records go to disk (a detector at full size records gigabytes)
    reference: str  # the reference side's name in the report ("mmdet", "torch")

    def torch_model(self) -> Any:
        """The reference model, built when first asked for (a cache hit never asks)."""

    def torch_outputs(self, model, inputs: np.ndarray) -> dict[str, Any]:
        """The torch model's compared outputs by name, in execution order (tensors)."""

    def paddle_outputs(self, model, inputs: np.ndarray) -> dict[str, Any]:
        """The Paddle model's, under the same names."""

    def reference_key(self) -> Optional[dict]:
        """Everything the reference side's results depend on, for the cache (None: not cached)."""

    def write_report(self, result: StageResult, reports: Path) -> StageResult:
        """Write the stage's JSON and HTML report (and the index)."""


def ghm_pair(opts: ForwardOptions) -> ForwardPair:
    """The default pair: mmdet's GHM RetinaNet and ours (`align.ghm.forward`)."""
    from align.ghm.forward import GhmForward

    pair = GhmForward(opts.ckpt, opts.shape, opts.seed, opts.build_dir, perturb=opts.perturb)
    if opts.name:
        pair.stage = opts.name
    return pair


def run_forward(opts: ForwardOptions, pair: Optional[ForwardPair] = None) -> StageResult:
    """Compare ``pair`` (default: the GHM RetinaNet, `ghm_pair`) as the module docstring says;
    write ``<stage>*`` files into ``opts.reports``."""
    pair = pair or ghm_pair(opts)
    perturb_sigma = None
    if opts.perturb:
        perturb_sigma = perturb_parameter(pair.paddle_model, opts.perturb, scale=opts.perturb_scale, seed=opts.seed)
    timings: dict[str, float] = {}
    with progress_bar(pair.stage, total=2) as bar:
        t0 = time.perf_counter()
        torch_out, torch_layers, timings["torch_forward_s"], cache_status = reference_outputs(pair, opts)
        timings["reference_s"] = time.perf_counter() - t0
        bar.update(1)
        t0 = time.perf_counter()
        paddle_out, layer_rows = paddle_outputs(pair, torch_layers, opts)
        timings["paddle_forward_s"] = time.perf_counter() - t0
        bar.update(1)
    del torch_layers

    tensors = [diff_arrays(name, torch_out[name], paddle_out[name], rel_tol=opts.rel_tol, mean_tol=opts.mean_tol)
               for name in torch_out]
    reprod = reprod_log_diff(paddle_out, torch_out, opts.reports, pair.stage, opts.mean_tol)
    grad_rows = gradient_rows(pair, opts) if opts.backward else []
    isolated: list[TensorDiff] = []
    own: list[TensorDiff] = []
    tables = []
    meta = {**pair.meta, "seed": opts.seed, "input_shape": describe_inputs(pair.inputs),
            "perturbed_parameter": opts.perturb, "perturbation_std": perturb_sigma,
            "layers_compared": len(layer_rows), "backward": opts.backward, "isolate": opts.isolate,
            # "hit": the reference side came from build/cache (its forward time is then 0); "off": no cache.
            "reference_cache": cache_status}
    if opts.isolate:
        t0 = time.perf_counter()
        forward_rows, backward_rows, kinds, recorded = run_isolated(pair, opts)
        timings["isolated_s"] = time.perf_counter() - t0
        own = forward_rows + backward_rows
        isolated = in_place_of_unisolated(forward_rows, layer_rows) + backward_rows
        accumulated = layer_rows + [dataclasses.replace(r, name=f"{r.name[len('grad.'):]}.grad") for r in grad_rows]
        tables = isolation_tables(forward_rows, backward_rows, accumulated, kinds)
        meta.update(isolated_layer_calls=len(isolated), recorded_gb=round(recorded / 2 ** 30, 2),
                    peak_memory_gb=round(peak_memory_gb(), 2))
    meta.update({k: round(v, 3) for k, v in timings.items()})

    # With isolation the layer rows are each layer's own error; the accumulated ones are in a
    # table and drawn behind them on the layer figure.
    # A layer isolation cannot run on its own (several outputs, keyword inputs: an LSTM, an
    # attention) keeps its parameters' gradients among the decisive rows.
    unisolated = ([r for r in grad_rows if f"{r.name[len('grad.'):]}.grad" not in {i.name for i in isolated}]
                  if opts.isolate else grad_rows)
    decisive = tensors + (isolated + unisolated if opts.isolate else layer_rows + grad_rows)
    return pair.write_report(StageResult(
        stage=pair.stage,
        title=pair.title,
        passed=all(r.passed for r in decisive),
        tensors=tensors + unisolated,
        layers=isolated if opts.isolate else layer_rows,
        accumulated_layers=layer_rows if opts.isolate else [],
        thresholds={"rel_max": opts.rel_tol, "mean_abs": opts.mean_tol},
        meta=meta,
        extra_tables=tables,
        reprod_log=reprod,
        reprod_log_check=opts.mean_tol,
        headline=(Headline.worst(own, opts.rel_tol, "worst own layer error (isolated)") if opts.isolate
                  else Headline.worst(tensors, opts.rel_tol, "worst output, max|diff| / max|ref|")),
        seconds={pair.reference: timings["torch_forward_s"], "paddle": timings["paddle_forward_s"]},
    ), opts.reports)


def in_place_of_unisolated(forward_rows: list[TensorDiff], layer_rows: list[TensorDiff]) -> list[TensorDiff]:
    """The isolated forward rows in execution order, with the accumulated row of each layer call
    isolation could not run (several outputs, keyword inputs: an attention, an LSTM) in its place,
    its reason saying so: a fault in such a layer is then still named at it, after every
    isolated layer before it passed."""
    own = {row.name: row for row in forward_rows}
    merged = []
    for row in layer_rows:
        if row.name in own:
            merged.append(own.pop(row.name))
        else:
            merged.append(dataclasses.replace(row, reason="; ".join(
                r for r in ("not isolated: accumulated error", row.reason) if r)))
    return merged + list(own.values())


def reference_outputs(pair: ForwardPair, opts: ForwardOptions):
    """The torch side's outputs and layer records (layer names already mapped to Paddle's); with
    ``opts.cache`` from ``build_dir/cache`` when an entry matches the pair's reference key, the
    input, the options and torch's thread count (and saved there otherwise). Returns them, the
    torch forward time (0 on a hit) and the cache status: "off", "hit", "miss", "mismatch",
    "fresh" (or "not cacheable" for a pair without a reference key)."""
    import torch

    reference = pair.reference_key() if opts.cache else None
    cache = ReferenceCache(opts.build_dir / "cache")
    key = None
    if reference is not None:
        key = cache_key({"stage": "forward", "format": 3, **reference, "input_shape": describe_inputs(pair.inputs),
                         "seed": opts.seed, "layers": opts.layers, "torch_threads": torch.get_num_threads()})
        arrays = None if opts.fresh else cache.load(pair.stage, key)
        if arrays is not None:
            outputs = {k[len("out:"):]: v for k, v in arrays.items() if k.startswith("out:")}
            layers = {k[len("layer:"):]: v for k, v in arrays.items() if k.startswith("layer:")}
            return outputs, layers, 0.0, "hit"
    status = ("off" if not opts.cache else "not cacheable" if reference is None else "fresh" if opts.fresh
              else cache.last_status)
    t0 = time.perf_counter()
    model = pair.torch_model()
    selection = getattr(pair, "selection", None)
    recorder = (TorchRecorder(model, selection.torch, selection.torch_adapters) if selection
                else TorchRecorder(model))
    with torch.no_grad(), (recorder if opts.layers else nullcontext()):
        outputs = {name: t.detach().numpy().copy() for name, t in pair.torch_outputs(model, pair.inputs).items()}
    layers = {_rename(pair.name_map, k): v for k, v in recorder.records.items()}
    seconds = time.perf_counter() - t0
    if key is not None:
        cache.save(pair.stage, key, {**{f"out:{k}": v for k, v in outputs.items()},
                                     **{f"layer:{k}": v for k, v in layers.items()}})
    return outputs, layers, seconds, status


def paddle_outputs(pair: ForwardPair, reference_layers: dict, opts: ForwardOptions):
    """Our outputs (numpy) and, with ``opts.layers``, one row per leaf layer call."""
    import paddle

    selection = getattr(pair, "selection", None)
    comparer = PaddleComparer(pair.paddle_model, reference_layers, rel_tol=opts.rel_tol, mean_tol=opts.mean_tol,
                              **(dict(names=selection.paddle, adapters=selection.paddle_adapters) if selection
                                 else {}))
    with paddle.no_grad(), (comparer if opts.layers else nullcontext()):
        outputs = {name: np.array(t.numpy(), copy=True)
                   for name, t in pair.paddle_outputs(pair.paddle_model, pair.inputs).items()}
    return outputs, comparer.rows if opts.layers else []


def projection(outputs: dict, seed: int) -> np.ndarray:
    """``R`` of the loss ``sum(output * R)``: seeded standard normal, the first output's shape."""
    first = next(iter(outputs.values()))
    return np.random.default_rng(seed + 1).standard_normal(tuple(first.shape)).astype(np.float32)


def torch_projected_loss(outputs: dict, seed: int):
    import torch

    first = next(iter(outputs.values()))
    return (first * torch.from_numpy(projection(outputs, seed)).to(first.dtype)).sum()


def paddle_projected_loss(outputs: dict, seed: int):
    import paddle

    first = next(iter(outputs.values()))
    return (first * paddle.to_tensor(projection(outputs, seed)).astype(first.dtype)).sum()


def gradient_rows(pair: ForwardPair, opts: ForwardOptions) -> list[TensorDiff]:
    """Every trainable parameter's gradient of `projected_loss`, normal backward on both sides,
    named ``grad.<paddle name>``; Linear weights compared in torch's layout transposed."""
    model = pair.torch_model()
    model.zero_grad()
    torch_projected_loss(pair.torch_outputs(model, pair.inputs), opts.seed).backward()
    pair.paddle_model.clear_gradients()
    with recurrent_layers_differentiable(pair.paddle_model):
        paddle_projected_loss(pair.paddle_outputs(pair.paddle_model, pair.inputs), opts.seed).backward()
    paddle_params = dict(pair.paddle_model.named_parameters())
    conversions = getattr(pair, "conversions", None)
    if conversions:
        # Through the weights' own conversions: a packed or split tensor's gradient is
        # rearranged as the tensor was.
        torch_grads = {name: None if p.grad is None else p.grad.numpy()
                       for name, p in model.named_parameters() if p.requires_grad}
        expected = convert_arrays(conversions, torch_grads)
        return layer_scaled([_grad_row(f"grad.{key}", ref, paddle_params.get(key), opts)
                             for key, ref in expected.items()], opts.rel_tol)
    rows = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        target = pair.name_map.tensor(name)
        ref = None if param.grad is None else param.grad.numpy()
        if ref is not None and is_linear_weight(model, name):
            ref = ref.T
        rows.append(_grad_row(f"grad.{target}", ref, paddle_params.get(target), opts))
    return layer_scaled(rows, opts.rel_tol)


def layer_scaled(rows: list[TensorDiff], rel_tol: float, what: str = "gradient") -> list[TensorDiff]:
    """``rows`` with a failed gradient passed when its max|diff| is within ``rel_tol`` of the largest
    gradient of its layer's parameters. A gradient that cancels to zero (an attention key
    projection's bias: softmax ignores what every key shares) is rounding noise on both sides,
    whose relative error means nothing; measured against its layer it is still caught when it is
    wrong by as little as ``rel_tol`` of what the layer's other gradients are. ``what`` names the
    rows' kind in the reason (the training stage scales parameters and optimizer state alike)."""
    scale: dict[str, float] = {}
    for row in rows:
        layer = row.name.rpartition(".")[0]
        scale[layer] = max(scale.get(layer, 0.0), row.ref_max_abs or 0.0)
    out = []
    for row in rows:
        bound = rel_tol * scale.get(row.name.rpartition(".")[0], 0.0)
        if not row.passed and row.finite and row.test_shape == row.ref_shape and row.max_abs is not None \
                and row.max_abs <= bound:
            row = dataclasses.replace(row, passed=True, reason=(
                f"{row.reason}, but max|diff| {row.max_abs:.1e} is within {rel_tol:g} of its layer's largest "
                f"{what} {bound / rel_tol:.1e}"))
        out.append(row)
    return out


@contextmanager
def recurrent_layers_differentiable(paddle_model):
    """Paddle's LSTM, GRU and SimpleRNN in training mode inside the block when they have no dropout:
    in evaluation mode Paddle's recurrent kernel keeps nothing for the backward pass (it fails with
    "Tensor holds no memory"); without dropout both modes compute the same."""
    import paddle

    switched = [layer for layer in paddle_model.sublayers(include_self=True)
                if isinstance(layer, paddle.nn.layer.rnn.RNNBase) and not layer.training
                and not getattr(layer, "dropout", 0)]
    for layer in switched:
        layer.train()
    try:
        yield
    finally:
        for layer in switched:
            layer.eval()


def _grad_row(name: str, ref, param, opts: ForwardOptions) -> TensorDiff:
    got = None if param is None or param.grad is None else param.grad.numpy()
    if ref is None or got is None:
        return missing_row(name, reason="no gradient in " + ("torch" if ref is None else "paddle"))
    return diff_arrays(name, ref, got, rel_tol=opts.rel_tol, mean_tol=opts.mean_tol)


def run_isolated(pair: ForwardPair, opts: ForwardOptions):
    """Every Paddle leaf layer on the reference's recorded input (and output gradient with
    ``backward``); returns the forward rows, the backward rows, the layer kinds by Paddle call
    key and the bytes recorded."""
    import torch

    model = pair.torch_model()
    with spill_store(opts.spill or pair.spill, opts.build_dir / "isolate") as store:
        selection = getattr(pair, "selection", None)
        recorder = TorchCallRecorder(model, store, grads=opts.backward, names=selection.torch if selection else None)
        with recorder:
            if opts.backward:
                torch_projected_loss(pair.torch_outputs(model, pair.inputs), opts.seed).backward()
            else:
                with torch.no_grad():
                    pair.torch_outputs(model, pair.inputs)
        kinds = {_rename(pair.name_map, c.key): c.kind for c in recorder.calls}
        tol = dict(rel_tol=opts.rel_tol, mean_tol=opts.mean_tol)
        forward_rows = isolated_forward(recorder.calls, store, pair.paddle_model, pair.name_map, **tol)
        backward_rows = (isolated_backward(recorder.calls, store, model, pair.paddle_model, pair.name_map, **tol)
                         if opts.backward else [])
        return forward_rows, backward_rows, kinds, store.nbytes


def describe_inputs(inputs) -> Any:
    """What the report and the cache key record of the inputs: one array's shape, or name -> dtype[shape]."""
    if isinstance(inputs, dict):
        return {k: f"{v.dtype}{list(v.shape)}" for k, v in inputs.items()}
    return list(inputs.shape)


def _rename(name_map: NameMap, key: str) -> str:
    """A torch call key (``layer``, ``layer#1``, ``layer[0]``) with its layer name mapped."""
    cut = min((i for i in (key.find("#"), key.find("[")) if i >= 0), default=len(key))
    return name_map.layer(key[:cut]) + key[cut:]


def first_divergence(result: StageResult) -> str | None:
    """Name of the first failing layer (or compared output) in execution order."""
    return first_failed_name(result.layers, result.tensors)
