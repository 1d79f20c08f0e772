"""Isolated layers: each layer's own error, apart from what accumulated before it.

In a normal run a layer's output differs from the reference's by its own
rounding plus everything upstream. Here every leaf layer of the Paddle model
is evaluated on the reference layer's own recorded input (and, backward, on
the reference's recorded output gradient), so each row is that layer's own
error: a wrong layer fails and the layers after it still pass.

1. `TorchCallRecorder` runs the reference (torch) forward, and backward when
   asked, recording per call of every leaf layer its tensor inputs, its output
   and the gradient of the loss with respect to that output. Calls are keyed
   as in `align.engine.capture` (``name``, ``name#1``, ...), so a layer used
   several times (a reused ReLU, a head shared across levels) is compared per
   call. Arrays go to a `SpillStore`: memory, or one ``.npy`` file each in a
   folder, so a large model's activations need not fit in memory at once.
2. `isolated_forward`: each Paddle layer on the recorded input, against the
   recorded output.
3. `isolated_backward`: each torch layer and its Paddle counterpart on the
   recorded input and output gradient; their input gradients and parameter
   gradients are compared (``autograd.grad`` on both sides: the models'
   accumulated ``.grad`` are left alone).

torch's ``MultiheadAttention`` (compared whole, see `align.engine.selection`) is recorded
batch first with its masks and run through Paddle's ``MultiHeadAttention`` with the masks
turned into Paddle's additive ``attn_mask`` (`attention_inputs`, `paddle_attention`).

In-place layers (``ReLU(inplace=True)``) are switched to out-of-place while
recording and isolating: same values, but the recorded input is not
overwritten and gradients can be taken with respect to it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np

from .capture import _select, call_key
from .compare import DEFAULT_MEAN_TOL, DEFAULT_REL_TOL, TensorDiff, diff_arrays, missing_row
from .weights import NameMap


def layer_kind(layer) -> str:
    """``conv``, ``BN``, ``ReLU``, ``pool``, ``linear``, ``upsample`` or the class name."""
    name = type(layer).__name__.lower()
    for part, kind in (("conv", "conv"), ("batchnorm", "BN"), ("relu", "ReLU"), ("pool", "pool"),
                       ("linear", "linear"), ("upsample", "upsample")):
        if part in name:
            return kind
    return type(layer).__name__


class SpillStore:
    """Arrays by key, kept in memory or, with a folder, spilled to one ``.npy`` file each."""

    def __init__(self, folder: Optional[Path] = None):
        self.folder = folder
        self._arrays: dict[str, np.ndarray] = {}
        self._files: dict[str, Path] = {}
        self.nbytes = 0

    def put(self, key: str, array: np.ndarray) -> None:
        self.nbytes += array.nbytes
        if self.folder is None:
            self._arrays[key] = array
            return
        path = self.folder / f"{len(self._files):06d}.npy"
        np.save(path, array)
        self._files[key] = path

    def get(self, key: str) -> np.ndarray | None:
        if self.folder is None:
            return self._arrays.get(key)
        path = self._files.get(key)
        return None if path is None else np.load(path)

    def __contains__(self, key: str) -> bool:
        return key in self._arrays or key in self._files


@contextlib.contextmanager
def spill_store(spill: bool, parent: Optional[Path] = None) -> Iterator[SpillStore]:
    """A `SpillStore` for a block: in memory, or in a temporary folder (under ``parent``) removed after."""
    if not spill:
        yield SpillStore()
        return
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="isolate-", dir=parent) as folder:
        yield SpillStore(Path(folder))


@dataclass
class LayerCall:
    """One call of a reference leaf layer: its key, layer name, kind and number of tensor inputs."""

    key: str
    layer: str
    kind: str
    inputs: int


@contextlib.contextmanager
def out_of_place(torch_model) -> Iterator[None]:
    """Every module of ``torch_model`` with its ``inplace`` flag set computes out of place inside the block."""
    switched = [m for m in torch_model.modules() if getattr(m, "inplace", False) is True]
    for module in switched:
        module.inplace = False
    try:
        yield
    finally:
        for module in switched:
            module.inplace = True


class TorchCallRecorder:
    """Record each call of a torch module's leaf layers: inputs, output and (with ``grads``)
    the output's gradient once ``backward`` runs. ``calls`` lists them in execution order."""

    def __init__(self, module, store: SpillStore, grads: bool = False, names: Optional[list[str]] = None):
        self.module, self.store, self.grads = module, store, grads
        self._layers = _select(dict(module.named_modules()), names, lambda m: next(m.children(), None) is None)
        self.calls: list[LayerCall] = []
        self._counts: Counter[str] = Counter()
        self._open: dict[str, str] = {}
        self._handles: list = []
        self._inplace = out_of_place(module)

    def _pre(self, name: str):
        import torch

        def hook(_module, args, kwargs):
            key = call_key(name, self._counts[name])
            self._counts[name] += 1
            self._open[name] = key
            if isinstance(_module, torch.nn.MultiheadAttention):
                for part, tensor in attention_inputs(_module, args, kwargs).items():
                    self.store.put(f"{key}/{part}", tensor.detach().cpu().numpy().copy())
                self.calls.append(LayerCall(key, name, layer_kind(_module), 3))
                return
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            for i, tensor in enumerate(tensors):
                self.store.put(f"{key}/in{i}", tensor.detach().cpu().numpy().copy())
            self.calls.append(LayerCall(key, name, layer_kind(_module), len(tensors)))
        return hook

    def _post(self, name: str):
        import torch

        def hook(_module, _args, output):
            key = self._open.pop(name)
            if isinstance(_module, torch.nn.MultiheadAttention):
                # (attention output, weights or None); batch first as its inputs were recorded.
                output = output[0] if _module.batch_first else output[0].transpose(0, 1)
            if not isinstance(output, torch.Tensor):
                return
            self.store.put(f"{key}/out", output.detach().cpu().numpy().copy())
            if self.grads and output.requires_grad:
                output.register_hook(lambda grad, key=key: self.store.put(f"{key}/grad", grad.cpu().numpy().copy()))
        return hook

    def __enter__(self) -> "TorchCallRecorder":
        self._inplace.__enter__()
        for name, layer in self._layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._post(name)))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inplace.__exit__(*exc_info)


def _paddle_key(name_map: NameMap, call: LayerCall) -> str:
    mapped = name_map.layer(call.layer)
    return mapped + call.key[len(call.layer):]


def isolated_forward(calls: list[LayerCall], store: SpillStore, paddle_model, name_map: NameMap, *,
                     rel_tol: float = DEFAULT_REL_TOL, mean_tol: float = DEFAULT_MEAN_TOL) -> list[TensorDiff]:
    """One row per recorded call: the Paddle layer on the recorded input against the recorded
    output, named by the Paddle call key (a layer Paddle lacks fails)."""
    import paddle

    layers = dict(paddle_model.named_sublayers())
    rows = []
    with paddle.no_grad():
        for call in calls:
            key, reference = _paddle_key(name_map, call), store.get(f"{call.key}/out")
            if reference is None:
                continue
            layer = layers.get(name_map.layer(call.layer))
            if layer is None:
                rows.append(missing_row(key, ref_shape=reference.shape, reason="missing in paddle"))
                continue
            inputs = [paddle.to_tensor(store.get(f"{call.key}/in{i}")) for i in range(call.inputs)]
            output = paddle_attention(layer, inputs, store, call.key) if call.kind == "MultiheadAttention" \
                else layer(*inputs)
            rows.append(diff_arrays(key, reference, output.numpy(), rel_tol=rel_tol, mean_tol=mean_tol))
    return rows


def attention_inputs(module, args: tuple, kwargs: dict) -> dict:
    """The tensors of a call of torch's ``MultiheadAttention``: ``in0``, ``in1``, ``in2`` the query
    ``(N, L, E)``, key and value ``(N, S, E)`` batch first, and the ``key_padding_mask`` ``(N, S)``
    and ``attn_mask`` ``(L, S)`` or ``(N * heads, L, S)`` that were given (bool: True masks out;
    float: added to the scores)."""
    import inspect

    import torch

    bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    first = (lambda t: t) if module.batch_first else (lambda t: t.transpose(0, 1))
    parts = {f"in{i}": first(bound[name]) for i, name in enumerate(("query", "key", "value"))}
    parts.update({name: bound[name] for name in ("key_padding_mask", "attn_mask")
                  if isinstance(bound.get(name), torch.Tensor)})
    return parts


def paddle_attention(layer, inputs: list, store: "SpillStore", key: str):
    """Paddle's ``MultiHeadAttention`` on a recorded torch call (`attention_inputs`): torch's masks
    summed into one additive ``attn_mask`` ``(N, heads or 1, L, S)``, as Paddle takes it."""
    import paddle

    query = inputs[0]
    n, length, source = query.shape[0], query.shape[1], inputs[1].shape[1]
    mask = np.zeros((n, 1, length, source), dtype=np.float64)
    padding, attention = store.get(f"{key}/key_padding_mask"), store.get(f"{key}/attn_mask")
    if padding is not None:
        mask = mask + _additive(padding)[:, None, None, :]
    if attention is not None:
        attention = _additive(attention)
        mask = mask + (attention.reshape(n, -1, length, source) if attention.ndim == 3 else attention)
    if padding is None and attention is None:
        return layer(*inputs)
    return layer(*inputs, attn_mask=paddle.to_tensor(mask.astype(query.numpy().dtype)))


def _additive(mask: np.ndarray) -> np.ndarray:
    """A torch attention mask as scores to add: a bool mask's True is -inf."""
    return np.where(mask, -np.inf, 0.0) if mask.dtype == bool else mask.astype(np.float64)


def isolated_backward(calls: list[LayerCall], store: SpillStore, torch_model, paddle_model, name_map: NameMap,
                      *, rel_tol: float = DEFAULT_REL_TOL, mean_tol: float = DEFAULT_MEAN_TOL) -> list[TensorDiff]:
    """Per recorded call with an output gradient: rows ``<key>.input_grad`` and
    ``<key>.<param>.grad`` (each trainable parameter of the layer), torch's layer and
    Paddle's on the same recorded input and output gradient.

    A gradient that is a long sum (a convolution's weight gradient sums over every
    position of the batch) differs between two correct float32 implementations by their
    summation order, and where its terms cancel, by more than ``rel_tol`` of its largest
    value. So the reference layer also runs in float64: a row beyond ``rel_tol`` still
    passes when Paddle's result is no further from the float64 one than torch's own
    float32 result is (`within_reference_rounding`); its reason says so.
    """
    import paddle
    import torch

    torch_layers, paddle_layers = dict(torch_model.named_modules()), dict(paddle_model.named_sublayers())
    rows = []
    with out_of_place(torch_model):
        for call in calls:
            grad_out = store.get(f"{call.key}/grad")
            if grad_out is None or call.inputs != 1:
                continue
            key = _paddle_key(name_map, call)
            t_layer, p_layer = torch_layers[call.layer], paddle_layers.get(name_map.layer(call.layer))
            if p_layer is None:
                rows.append(missing_row(f"{key}.input_grad", reason="missing in paddle"))
                continue
            x = store.get(f"{call.key}/in0")
            names = [n for n, p in t_layer.named_parameters(recurse=False) if p.requires_grad]
            t_grads = _torch_grads(t_layer, names, x, grad_out, None)
            exact = _torch_grads(t_layer, names, x, grad_out, torch.float64)
            p_params = dict(p_layer.named_parameters(include_sublayers=False))
            # Token ids and masks have no gradient: only the parameters' are asked for.
            floating = np.issubdtype(x.dtype, np.floating)
            px = paddle.to_tensor(x, stop_gradient=not floating)
            mapped = [p_params.get(_local(name_map, call.layer, n)) for n in names]
            trainable = [p for p in mapped if p is not None and not p.stop_gradient]
            if not floating and not trainable:
                continue
            p_grads = paddle.grad([p_layer(px)], ([px] if floating else []) + trainable,
                                  grad_outputs=[paddle.to_tensor(grad_out)], allow_unused=True)
            p_grads = p_grads if floating else [None] + list(p_grads)
            p_by_param = dict(zip([id(p) for p in trainable], p_grads[1:]))
            transposed = isinstance(t_layer, torch.nn.Linear)
            for i, name in enumerate(["input"] + names):
                if i == 0 and not floating:
                    continue
                row_name = f"{key}.input_grad" if i == 0 else f"{key}.{name}.grad"
                test = p_grads[0] if i == 0 else (None if mapped[i - 1] is None or mapped[i - 1].stop_gradient
                                                  else p_by_param[id(mapped[i - 1])])
                if i > 0 and test is None:
                    rows.append(missing_row(row_name, reason="not a trainable paddle parameter"))
                    continue
                flip = transposed and name == "weight"
                rows.append(within_reference_rounding(
                    _grad_row(row_name, _t(t_grads[i], flip), test, rel_tol, mean_tol),
                    _t(t_grads[i], flip), _t(exact[i], flip), None if test is None else test.numpy()))
    return rows


def _torch_grads(layer, names: list[str], x: np.ndarray, grad_out: np.ndarray, dtype) -> list:
    """Gradients of ``layer`` at input ``x`` for output gradient ``grad_out``: the input's, then
    each named parameter's; with ``dtype`` on a copy of the layer in that precision."""
    import copy

    import torch

    if dtype is not None:
        layer = copy.deepcopy(layer).to(dtype)
    params = dict(layer.named_parameters(recurse=False))
    tx = torch.from_numpy(x)
    if not tx.is_floating_point():
        # Integer input (token ids): the parameters' gradients only, the input's is None.
        g = torch.from_numpy(grad_out).to(dtype or torch.from_numpy(grad_out).dtype)
        grads = torch.autograd.grad(layer(tx), [params[n] for n in names], grad_outputs=g, allow_unused=True)
        return [None] + [None if v is None else v.detach().numpy() for v in grads]
    tx = tx.to(dtype or tx.dtype).requires_grad_(True)
    g = torch.from_numpy(grad_out).to(tx.dtype)
    grads = torch.autograd.grad(layer(tx), [tx] + [params[n] for n in names], grad_outputs=g, allow_unused=True)
    return [None if v is None else v.detach().numpy() for v in grads]


def _t(array, transpose: bool):
    """A torch Linear weight's gradient in Paddle's ``(in, out)`` layout."""
    if array is None:
        return None
    return array.T if transpose else array


def within_reference_rounding(row: TensorDiff, reference, exact, test, factor: float = 2.0) -> TensorDiff:
    """``row`` passed when it failed only its bounds while ``test`` is no further (up to
    ``factor``) from ``exact`` (float64) than ``reference`` (float32) is; else ``row``."""
    if row.passed or not row.finite or reference is None or exact is None or test is None:
        return row
    if reference.shape != test.shape:
        return row
    ref_error = float(np.abs(reference.astype(np.float64) - exact).max())
    test_error = float(np.abs(test.astype(np.float64) - exact).max())
    if test_error > factor * ref_error:
        return row
    return dataclasses.replace(row, passed=True, reason=(
        f"{row.reason}, but within the reference's own float32 rounding: max|paddle - float64| "
        f"{test_error:.1e}, max|torch - float64| {ref_error:.1e}"))


def _local(name_map: NameMap, torch_layer: str, param: str) -> str:
    return name_map.tensor(f"{torch_layer}.{param}").rpartition(".")[2]


def _grad_row(name: str, reference, test, rel_tol: float, mean_tol: float) -> TensorDiff:
    if reference is None or test is None:
        return missing_row(name, reason="no gradient in " + ("torch" if reference is None else "paddle"))
    ref = reference if isinstance(reference, np.ndarray) else reference.numpy()
    return diff_arrays(name, ref, test.numpy(), rel_tol=rel_tol, mean_tol=mean_tol)


class IsolatedRow(NamedTuple):
    """A layer call's own error (isolated) beside its accumulated error (the normal run)."""

    call: str
    kind: str
    own_rel: float
    accumulated_rel: float
    passed: bool


def side_by_side(isolated: list[TensorDiff], accumulated: list[TensorDiff], kinds: dict[str, str]) -> list[IsolatedRow]:
    """One row per isolated call with the accumulated row of the same key (NaN when absent)."""
    normal = {row.name: row.rel_max for row in accumulated}
    return [IsolatedRow(row.name, kinds.get(row.name, ""), row.rel_max, normal.get(row.name, math.nan), row.passed)
            for row in isolated]


class KindRow(NamedTuple):
    """The worst own error among the layer calls of one kind."""

    kind: str
    calls: int
    worst_rel: float
    worst_call: str
    all_within: bool


def worst_per_kind(rows: list[TensorDiff], kinds: dict[str, str]) -> list[KindRow]:
    """Per layer kind (see `layer_kind`), the worst row; ``kinds`` maps call keys to kinds
    (see `kind_of` for how a row finds its call)."""
    groups: dict[str, list[TensorDiff]] = {}
    for row in rows:
        groups.setdefault(kind_of(row.name, kinds) or "other", []).append(row)
    out = []
    for kind, members in sorted(groups.items()):
        worst = max(members, key=lambda r: math.inf if math.isnan(r.rel_max) else r.rel_max)
        out.append(KindRow(kind, len(members), worst.rel_max, worst.name, all(r.passed for r in members)))
    return out


def isolation_tables(forward_rows: list[TensorDiff], backward_rows: list[TensorDiff],
                     accumulated: list[TensorDiff], kinds: dict[str, str]) -> list[tuple]:
    """The report tables of an isolated run: own beside accumulated error (forward, and
    backward when there are rows), and the worst own error per layer kind.

    ``accumulated`` holds the normal run's rows under the same names (layer
    outputs by call key; parameter gradients as ``<layer>.<param>.grad``).
    """
    columns = ["call", "kind", "own rel", "accumulated rel", "own within"]
    tables = [("Each layer call's own error (isolated) beside its accumulated error (normal run), forward",
               columns, side_by_side(forward_rows, accumulated, kinds))]
    if backward_rows:
        backward_kinds = {row.name: kind_of(row.name, kinds) for row in backward_rows}
        tables.append(("Isolated backward: each layer call's input gradient and parameter gradients",
                       columns, side_by_side(backward_rows, accumulated, backward_kinds)))
    tables.append(("Worst own error per layer kind", ["kind", "rows", "worst rel", "worst", "all within"],
                   worst_per_kind(forward_rows + backward_rows, kinds)))
    return tables


def kind_of(row_name: str, kinds: dict[str, str]) -> str:
    """The kind of the layer call a row (``<call>``, ``<call>.input_grad``, ``<call>.<param>.grad``) belongs to."""
    for suffix in (".input_grad", ".grad"):
        if row_name.endswith(suffix):
            call = row_name[: -len(suffix)]
            if suffix == ".grad":
                call = call.rpartition(".")[0]
            return kinds.get(call, "")
    return kinds.get(row_name, "")


def peak_memory_gb() -> float:
    """Peak resident memory of this process so far, GB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2

