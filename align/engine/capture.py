"""Layer-by-layer capture: record torch layer outputs, diff Paddle's against them live.

Layers are matched by their dotted names (``named_modules()`` in torch,
``named_sublayers()`` in Paddle), which coincide when the Paddle model
mirrors the torch state-dict names. Only leaf layers (no children) are
hooked by default, so every number in the table comes from one primitive
operation and the first failing row points at the operation that diverged.

Keys: a layer called several times in one forward (a ResNet Bottleneck reuses
one ``relu`` three times; the shared RetinaHead runs once per FPN level) is
keyed ``name``, ``name#1``, ``name#2``, ... in call order. Outputs that are
tuples or lists add ``[i]``, dicts add ``[key]``.
"""
from __future__ import annotations

import difflib
from collections import Counter
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np

from .compare import DEFAULT_MEAN_TOL, DEFAULT_REL_TOL, TensorDiff, diff_arrays, missing_row


def call_key(name: str, call_index: int) -> str:
    """Key of the ``call_index``-th call (0-based) of the layer ``name``."""
    return name if call_index == 0 else f"{name}#{call_index}"


def _flatten(key: str, output: Any, is_tensor: Callable[[Any], bool]) -> Iterator[tuple[str, Any]]:
    """Yield ``(key, tensor)`` for every tensor in a possibly nested output; other values are skipped."""
    if is_tensor(output):
        yield key, output
    elif isinstance(output, (tuple, list)):
        for i, item in enumerate(output):
            yield from _flatten(f"{key}[{i}]", item, is_tensor)
    elif isinstance(output, dict):
        for name, item in output.items():
            yield from _flatten(f"{key}[{name}]", item, is_tensor)


def _select(named: dict[str, Any], names: list[str] | None, is_leaf: Callable[[Any], bool]) -> dict[str, Any]:
    """The layers to hook: the given names (validated) or every leaf, in registration order."""
    if names is None:
        return {name: layer for name, layer in named.items() if name and is_leaf(layer)}
    selected = {}
    for name in names:
        if name not in named:
            close = difflib.get_close_matches(name, list(named), n=5)
            raise KeyError(f"no layer named {name!r}; close names: {close}")
        selected[name] = named[name]
    return selected


class _CallHooks:
    """Forward hooks on named layers, active inside a ``with`` block; each call of a layer is
    keyed by `call_key`. ``register`` names the layer method that adds a forward hook; what
    the hooks collect (``collected``, a dict or list) is cleared when a block starts. A
    subclass says what a hook does (`_hook`)."""

    def __init__(self, layers: dict[str, Any], register: str, collected):
        self._layers = layers
        self._register_method = register
        self._collected = collected
        self._calls: Counter[str] = Counter()
        self._handles: list = []

    def _next_key(self, name: str) -> str:
        key = call_key(name, self._calls[name])
        self._calls[name] += 1
        return key

    def _hook(self, name: str) -> Callable:
        raise NotImplementedError

    def __enter__(self):
        self._collected.clear()
        self._calls.clear()
        for name, layer in self._layers.items():
            self._handles.append(getattr(layer, self._register_method)(self._hook(name)))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class TorchRecorder(_CallHooks):
    """Record the outputs of a torch module's layers during a forward pass.

    Usage::

        with TorchRecorder(model) as rec:
            model(x)
        rec.records  # key -> ndarray, in execution order

    Each output is copied to numpy at the moment the layer returns: an
    in-place op later in the forward (``ReLU(inplace=True)`` after BN) would
    otherwise rewrite what was recorded. Half and bfloat16 tensors are
    widened to float32; other dtypes are kept.
    """

    def __init__(self, module, names: list[str] | None = None, adapters: Optional[dict[str, Callable]] = None):
        self.module = module
        self.records: dict[str, np.ndarray] = {}
        # Layer name -> how its output is read (`align.engine.selection.adapter`).
        self.adapters = adapters or {}
        super().__init__(_select(dict(module.named_modules()), names, lambda m: next(m.children(), None) is None),
                         "register_forward_hook", self.records)

    def _hook(self, name: str):
        import torch

        def hook(_module, _inputs, output):
            key = self._next_key(name)
            output = self.adapters[name](output) if name in self.adapters else output
            for sub_key, tensor in _flatten(key, output, lambda v: isinstance(v, torch.Tensor)):
                tensor = tensor.detach().cpu()
                if tensor.dtype in (torch.float16, torch.bfloat16):
                    tensor = tensor.float()
                self.records[sub_key] = tensor.numpy().copy()

        return hook


def paddle_to_numpy(tensor) -> np.ndarray:
    """A numpy copy of a Paddle tensor; half and bfloat16 widened to float32."""
    import paddle

    if tensor.dtype in (paddle.float16, paddle.bfloat16):
        tensor = tensor.astype("float32")
    return np.array(tensor.numpy(), copy=True)


class PaddleComparer(_CallHooks):
    """Diff a Paddle layer's layer outputs against recorded reference outputs, as they happen.

    Usage::

        with PaddleComparer(paddle_model, rec.records, rel_tol=1e-5, mean_tol=1e-5) as cmp:
            paddle_model(x)
        cmp.rows  # list[TensorDiff] in Paddle's execution order

    Only the `TensorDiff` row is kept per output, never the tensor: a full
    800x1344 ResNet-50 forward has gigabytes of activations per side.

    After the ``with`` block, ``rows`` also holds a failed row for every
    reference key the Paddle side never produced ("missing in paddle"),
    placed after the row of the reference key that precedes it, so that
    `first_failure` still points at the earliest divergence. Paddle outputs
    with no reference key fail in place ("missing in reference").
    """

    def __init__(
        self,
        layer,
        reference: dict[str, np.ndarray],
        *,
        rel_tol: float = DEFAULT_REL_TOL,
        mean_tol: float = DEFAULT_MEAN_TOL,
        names: list[str] | None = None,
        adapters: Optional[dict[str, Callable]] = None,
    ):
        self.layer = layer
        self.adapters = adapters or {}
        self.reference = reference
        self.rel_tol = rel_tol
        self.mean_tol = mean_tol
        self.rows: list[TensorDiff] = []
        super().__init__(_select(dict(layer.named_sublayers()), names,
                                 lambda m: next(iter(m.children()), None) is None),
                         "register_forward_post_hook", self.rows)

    def _hook(self, name: str):
        import paddle

        def hook(_layer, _inputs, output):
            key = self._next_key(name)
            output = self.adapters[name](output) if name in self.adapters else output
            for sub_key, tensor in _flatten(key, output, lambda v: isinstance(v, paddle.Tensor)):
                array = paddle_to_numpy(tensor)
                if sub_key in self.reference:
                    row = diff_arrays(
                        sub_key,
                        self.reference[sub_key],
                        array,
                        rel_tol=self.rel_tol,
                        mean_tol=self.mean_tol,
                    )
                else:
                    row = missing_row(sub_key, test_shape=array.shape, reason="missing in reference")
                self.rows.append(row)

        return hook

    def __exit__(self, *exc_info) -> None:
        super().__exit__(*exc_info)
        self.rows[:] = self._with_missing_rows(self.rows)

    def _with_missing_rows(self, rows: list[TensorDiff]) -> list[TensorDiff]:
        produced = {row.name for row in rows}
        position = {row.name: i for i, row in enumerate(rows)}
        # Insertions keyed by the index of the row they follow (-1: before all).
        after: dict[int, list[TensorDiff]] = {}
        anchor = -1
        for key, value in self.reference.items():
            if key in produced:
                anchor = position[key]
            else:
                after.setdefault(anchor, []).append(
                    missing_row(key, ref_shape=np.shape(value), reason="missing in paddle")
                )
        merged = list(after.get(-1, []))
        for i, row in enumerate(rows):
            merged.append(row)
            merged.extend(after.get(i, []))
        return merged


def named_parameter(layer, name: str):
    """The Paddle parameter ``name`` of ``layer``; a ``KeyError`` naming it and the closest names."""
    params = dict(layer.named_parameters())
    if name not in params:
        close = difflib.get_close_matches(name, list(params), n=5)
        raise KeyError(f"no parameter named {name!r}; close names: {close}")
    return params[name]


def perturb_parameter(layer, name: str, scale: float = 1e-3, seed: int = 0) -> float:
    """Add seeded Gaussian noise to one Paddle parameter in place, to test that a diff is caught.

    The noise standard deviation is ``scale`` times the parameter's own
    spread: its std, or its max-abs when it is constant (a BN weight of
    ones), or 1.0 when it is all zero (a fresh bias), so the perturbation is
    never a no-op.

    Returns:
        the noise standard deviation used.
    Raises:
        KeyError: naming ``name`` and the closest parameter names.
    """
    param = named_parameter(layer, name)
    value = param.numpy().astype(np.float64)
    spread = float(value.std()) if value.size else 0.0
    if spread == 0.0:
        spread = float(np.abs(value).max()) if value.size else 0.0
    if spread == 0.0:
        spread = 1.0
    sigma = scale * spread
    noise = np.random.default_rng(seed).normal(0.0, sigma, size=value.shape)
    param.set_value((value + noise).astype(param.numpy().dtype))
    return sigma


class ReluMaskCensus:
    """Counts the elements whose ReLU mask differs between a torch model and a Paddle model.

    During torch's forward pass every ``nn.ReLU`` records its mask (output > 0)
    per call; during Paddle's forward pass of the same batch each ReLU call,
    matched by layer name and call index (the layers have the same names and
    run in the same order), compares its mask with torch's. torch's ReLUs may
    work in place, so its pre-activations are not seen; at a disagreement
    Paddle's |pre-activation| shows how close to zero the element was.

    Call `start_step` before each step's torch forward pass and
    `finish_step` (the step's flips) after Paddle's; `layers` maps a ReLU
    layer's name to ``[flips, elements, largest |Paddle pre-activation| at a
    flip]`` over all steps so far; `step_layers` maps the layers with a flip in
    the current step to ``[flips, largest |pre-activation| at a flip, largest
    |pre-activation| of the call, spacings]``: the largest |pre-activation|
    sets the scale of the layer's rounding, and ``spacings`` holds each flipped
    element's |pre-activation| in units of the float spacing at that scale (in
    the pre-activation's own dtype).

    The torch masks of a step can be kept (`reference_masks`, once torch's
    forward pass is over) and given back in a later run without a torch model
    (``torch_model=None``, ``start_step(masks)``), for a replayed reference.
    """

    def __init__(self, torch_model, paddle_model):
        import paddle
        import torch

        self._masks: dict[tuple[str, int], np.ndarray] = {}
        self._torch_calls: Counter[str] = Counter()
        self._paddle_calls: Counter[str] = Counter()
        self.step_flips = 0
        self.layers: dict[str, list] = {}
        self.step_layers: dict[str, list] = {}
        self._handles = [] if torch_model is None else [
            m.register_forward_hook(self._torch_hook(n))
            for n, m in torch_model.named_modules() if isinstance(m, torch.nn.ReLU)]
        self._handles += [l.register_forward_post_hook(self._paddle_hook(n))
                          for n, l in paddle_model.named_sublayers() if isinstance(l, paddle.nn.ReLU)]

    def start_step(self, masks: Optional[Mapping[str, np.ndarray]] = None) -> None:
        """Begin a step; ``masks`` (by `call_key`, as `reference_masks` gave them) stand for
        torch's forward pass of the step."""
        self._masks.clear()
        self._torch_calls.clear()
        self._paddle_calls.clear()
        self.step_flips = 0
        self.step_layers = {}
        for key, mask in (masks or {}).items():
            name, _, index = key.partition("#")
            self._masks[(name, int(index or 0))] = np.asarray(mask)

    def reference_masks(self) -> dict[str, np.ndarray]:
        """torch's masks of the current step by `call_key` (before Paddle's forward pass uses them)."""
        return {call_key(name, index): mask for (name, index), mask in self._masks.items()}

    def finish_step(self) -> int:
        if self._masks:
            raise RuntimeError(f"torch's ReLU calls {sorted(self._masks)[:5]} have no Paddle "
                               "counterpart: the execution orders differ")
        return self.step_flips

    def _torch_hook(self, name: str):
        def hook(_module, _inputs, output):
            key = (name, self._torch_calls[name])
            self._torch_calls[name] += 1
            self._masks[key] = (output.detach() > 0).numpy()
        return hook

    def _paddle_hook(self, name: str):
        def hook(_layer, inputs, output):
            key = (name, self._paddle_calls[name])
            self._paddle_calls[name] += 1
            reference = self._masks.pop(key, None)
            mine = (output > 0).numpy()
            if reference is None or reference.shape != mine.shape:
                raise RuntimeError(f"Paddle's ReLU call {key} of shape {mine.shape} has no torch "
                                   "counterpart: the execution orders differ")
            flips = reference != mine
            count = int(flips.sum())
            row = self.layers.setdefault(name, [0, 0, 0.0])
            row[0] += count
            row[1] += flips.size
            if count:
                pre = np.abs(inputs[0].numpy())
                at_flip = float(pre[flips].max())
                row[2] = max(row[2], at_flip)
                scale = pre.max()
                step = self.step_layers.setdefault(name, [0, 0.0, 0.0, np.zeros(0)])
                step[0] += count
                step[1] = max(step[1], at_flip)
                step[2] = max(step[2], float(scale))
                step[3] = np.concatenate([step[3], pre[flips] / np.spacing(scale)])
            self.step_flips += count
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
