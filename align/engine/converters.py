"""How a torch tensor becomes Paddle tensors: per-class converters and the map file's tensor rules.

A class converter turns one tensor a torch module owns itself (not its children's) into
the Paddle tensors it becomes, named relative to the Paddle counterpart of the module:

    converter(name, array, module) -> {paddle name: array}

e.g. torch's ``MultiheadAttention.in_proj_weight`` ``(3E, E)`` becomes ``q_proj.weight``,
``k_proj.weight`` and ``v_proj.weight``, each ``(E, E)`` transposed. The same function
converts the gradients for the ``--backward`` rows, so a converter only rearranges
elements (split, concatenate, transpose, reorder, reshape) and never computes with them.

Built in, for what both frameworks ship (`BUILTIN`, looked up along the class's MRO):

- ``Linear``: ``weight`` ``(out, in)`` transposed to Paddle's ``(in, out)``;
- ``MultiheadAttention``: the packed ``in_proj_weight`` / ``in_proj_bias`` (or the separate
  ``q_proj_weight``, ... of a model with ``kdim`` or ``vdim``) split into ``q_proj``,
  ``k_proj``, ``v_proj``, weights transposed (``out_proj`` is a ``Linear`` child);
- ``LSTM``, ``GRU``, ``RNN``: ``weight_ih_l<k>[_reverse]`` and the rest keep their names;
  the gates are reordered from torch's order to Paddle's (`GATES`; measured to coincide:
  i, f, g, o for the LSTM and r, z, n for the GRU);
- everything else (Conv, LayerNorm, Embedding, BatchNorm...): the name kept, BatchNorm's
  ``running_mean`` / ``running_var`` renamed ``_mean`` / ``_variance``, torch's
  ``num_batches_tracked`` dropped (`default_converter`).

A map file may register converters of its own by class (``"converters": {"MyAttention":
"mypkg.convert:my_attention"}``, the class's name or ``module.QualName``), which come
before the built-in ones, and list tensor rules (`TensorRule`) that come before both.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

Converter = Callable[[str, np.ndarray, Any], dict]

STATISTICS = {"running_mean": "_mean", "running_var": "_variance"}
DROPPED = ("num_batches_tracked",)

# Gate order of the stacked gate rows of each recurrent class: torch's, then Paddle's.
GATES = {"LSTM": ("ifgo", "ifgo"), "GRU": ("rzn", "rzn"), "RNN": ("h", "h")}


def default_converter(name: str, array: np.ndarray, module) -> dict:
    """The tensor under its own name (BatchNorm statistics under Paddle's; the batch count dropped)."""
    if name in DROPPED:
        return {}
    return {STATISTICS.get(name, name): array}


def linear(name: str, array: np.ndarray, module) -> dict:
    """``weight`` ``(out, in)`` -> ``(in, out)``; ``bias`` as it is."""
    return {name: array.T if name == "weight" else array}


def multihead_attention(name: str, array: np.ndarray, module) -> dict:
    """``in_proj_weight`` ``(3E, E)`` -> ``{q,k,v}_proj.weight`` ``(E, E)`` transposed;
    ``in_proj_bias`` ``(3E,)`` -> ``{q,k,v}_proj.bias`` ``(E,)``; ``q_proj_weight`` ``(E, kdim)``
    -> ``q_proj.weight`` ``(kdim, E)``. torch's ``bias_k`` / ``bias_v`` have no Paddle counterpart."""
    if name in ("in_proj_weight", "in_proj_bias"):
        pieces = np.split(array, 3, axis=0)
        suffix = "weight" if name.endswith("weight") else "bias"
        return {f"{p}_proj.{suffix}": piece.T if suffix == "weight" else piece
                for p, piece in zip("qkv", pieces)}
    if name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        return {f"{name[0]}_proj.weight": array.T}
    raise ValueError(f"MultiheadAttention.{name} has no Paddle counterpart (Paddle's MultiHeadAttention "
                     "has no bias_k / bias_v)")


def recurrent(kind: str) -> Converter:
    """The converter of torch's ``kind`` ("LSTM", "GRU", "RNN"): names kept, the gate blocks of
    ``weight_ih_l<k>`` ``(G*H, in)``, ``weight_hh_l<k>`` ``(G*H, H)`` and the biases ``(G*H,)``
    reordered from torch's gate order to Paddle's."""
    source, target = GATES[kind]

    def convert(name: str, array: np.ndarray, module) -> dict:
        if getattr(module, "proj_size", 0):
            raise ValueError(f"{kind} with proj_size has no Paddle counterpart")
        blocks = np.split(array, len(source), axis=0)
        return {name: np.concatenate([blocks[source.index(g)] for g in target], axis=0)}

    return convert


def builtin_converters() -> list[tuple[type, str, Converter]]:
    """``(torch class, its name, converter)``, most specific first."""
    import torch

    nn = torch.nn
    return [(nn.MultiheadAttention, "MultiheadAttention", multihead_attention),
            (nn.Linear, "Linear", linear),
            (nn.LSTM, "LSTM", recurrent("LSTM")), (nn.GRU, "GRU", recurrent("GRU")),
            (nn.RNN, "RNN", recurrent("RNN"))]


def load_function(spec: str, where: str) -> Callable:
    """``"pkg.module:function"`` -> the function; a ``ValueError`` naming ``where`` (an option, a
    map entry) otherwise."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{where} {spec!r}: expected module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{where} {spec!r}: cannot import {module_name} ({err})") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ValueError(f"{where} {spec!r}: {module_name} has no function {attr}")
    return function


def class_names(module) -> list[str]:
    """The names a map file may give a module's class by: ``Name`` and ``module.QualName``, along the MRO."""
    names = []
    for cls in type(module).__mro__:
        names += [cls.__name__, f"{cls.__module__}.{cls.__qualname__}"]
    return names


def converter_for(module, registered: dict[str, Converter]) -> tuple[Converter, str]:
    """The converter of ``module`` and what it is called: a registered one by class name (MRO
    order), else a built-in one, else `default_converter`."""
    for name in class_names(module):
        if name in registered:
            return registered[name], name
    for cls, name, converter in builtin_converters():
        if isinstance(module, cls):
            return converter, name
    return default_converter, "default"


@dataclass
class TensorRule:
    """One rule of the map file's ``"tensors"`` list: full torch state-dict keys -> full Paddle keys.

    ``{"torch": "blk.scale", "paddle": "blk.alpha"}`` renames; with several Paddle keys the
    torch tensor is split along ``axis`` (in torch's layout) into ``sizes`` (equal parts when
    not given); with several torch keys they are concatenated along ``axis``. Then each
    resulting tensor is transposed (``"transpose": true`` reverses the axes, a list permutes
    them) and reshaped (``"reshape": [...]``)."""

    torch: tuple[str, ...]
    paddle: tuple[str, ...]
    axis: int = 0
    sizes: Optional[tuple[int, ...]] = None
    transpose: Any = None
    reshape: Optional[tuple[int, ...]] = None

    @classmethod
    def parse(cls, item: Any, where: str) -> "TensorRule":
        """A rule from its JSON form; a ``ValueError`` naming ``where`` and the rule otherwise."""
        def names(value):
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{where}: {item!r}: torch and paddle are a key or a list of keys")
            return tuple(value)

        if not isinstance(item, dict) or not {"torch", "paddle"} <= set(item):
            raise ValueError(f"{where}: {item!r}: a tensor rule is {{\"torch\": key(s), \"paddle\": key(s), ...}}")
        unknown = set(item) - {"torch", "paddle", "axis", "sizes", "transpose", "reshape"}
        if unknown:
            raise ValueError(f"{where}: {item!r}: unknown field(s) {sorted(unknown)}")
        rule = cls(names(item["torch"]), names(item["paddle"]), item.get("axis", 0),
                   tuple(item["sizes"]) if item.get("sizes") is not None else None, item.get("transpose"),
                   tuple(item["reshape"]) if item.get("reshape") is not None else None)
        if len(rule.torch) > 1 and len(rule.paddle) > 1:
            raise ValueError(f"{where}: {item!r}: several torch keys into several Paddle keys; "
                             "write one rule per Paddle key")
        if rule.sizes is not None and len(rule.sizes) != len(rule.paddle):
            raise ValueError(f"{where}: {item!r}: {len(rule.sizes)} sizes for {len(rule.paddle)} Paddle keys")
        return rule

    def apply(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The Paddle arrays (in ``self.paddle`` order) of the torch ones (in ``self.torch`` order)."""
        if len(arrays) > 1:
            pieces = [np.concatenate(list(arrays), axis=self.axis)]
        elif len(self.paddle) > 1:
            sizes = self.sizes or [arrays[0].shape[self.axis] // len(self.paddle)] * len(self.paddle)
            if sum(sizes) != arrays[0].shape[self.axis]:
                raise ValueError(f"tensor rule {list(self.torch)}: sizes {list(sizes)} do not add up to "
                                 f"{arrays[0].shape[self.axis]} along axis {self.axis}")
            pieces = np.split(arrays[0], np.cumsum(sizes)[:-1], axis=self.axis)
        else:
            pieces = [arrays[0]]
        if self.transpose is True:
            pieces = [p.T for p in pieces]
        elif self.transpose:
            pieces = [np.transpose(p, self.transpose) for p in pieces]
        if self.reshape is not None:
            pieces = [p.reshape(self.reshape) for p in pieces]
        return pieces
