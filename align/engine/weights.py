"""A torch module's weights carried over to a Paddle layer by name, with every key accounted for.

Names are rewritten by a `NameMap`: an ordered list of prefix rules (the first
rule whose torch prefix starts a name replaces it; a name no rule matches is
kept). A rule whose torch prefix ends in a dot names a module: it also matches
that module itself (``"fc."`` matches ``fc`` as well as ``fc.weight``). A rule
that matches no torch module of the model is an error (`NameMap.check`): a
misspelt rule would otherwise leave the names it meant unmapped without a word.

What a tensor becomes is said by, in this order: the map file's tensor rules
(rename, split, merge, transpose, reshape: `align.engine.converters.TensorRule`),
the converter of the class of the module that owns it (the map file's own,
``"converters"``, then the built-in ones: Linear transposed, MultiheadAttention's
packed projections split, the recurrent layers' gates; see `align.engine.converters`),
else the tensor under its mapped name (BatchNorm statistics renamed ``_mean`` /
``_variance``, ``num_batches_tracked`` dropped).

The conversion is strict: a torch key whose Paddle name does not exist, a
Paddle key nothing fills, or a shape that differs after the conversion is
an error that names the keys, before anything is copied. A tensor rule or a
registered converter that matches nothing is an error naming it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .converters import DROPPED as _DROPPED, STATISTICS as _STATISTICS
from .converters import TensorRule, class_names, converter_for, load_function
from .selection import CompareSpec

MAP_KEYS = ("prefixes", "tensors", "converters") + CompareSpec.KEYS


@dataclass
class NameMap:
    """Torch names -> Paddle names by ordered prefix rules ``(torch prefix, paddle prefix)``, with
    the map file's tensor rules, registered converters (class name -> ``module:function``) and
    what is compared (`CompareSpec`)."""

    prefixes: Sequence[tuple[str, str]] = field(default_factory=list)

    # Where the rules came from (a file), named by the errors about them.
    source: str = "name map"
    tensors: Sequence[TensorRule] = field(default_factory=list)
    converters: dict[str, str] = field(default_factory=dict)
    compare: CompareSpec = field(default_factory=CompareSpec)

    @classmethod
    def from_json(cls, path: str | Path) -> "NameMap":
        """``{"prefixes": [["backbone.", ""]], "tensors": [...], "converters": {...}, "ignore": [...],
        ...}`` (every key optional); a malformed file is a ``ValueError`` naming it."""
        path = Path(path)
        where = f"--map {path}"
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{where}: cannot read a JSON name map ({err})") from None
        if not isinstance(document, dict):
            raise ValueError(f"{where}: expected a JSON object with keys among {list(MAP_KEYS)}")
        unknown = sorted(set(document) - set(MAP_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; the keys are {list(MAP_KEYS)}")
        rules = document.get("prefixes", [])
        if not isinstance(rules, list) or not all(
                isinstance(r, list) and len(r) == 2 and all(isinstance(p, str) for p in r) for r in rules):
            raise ValueError(f"{where}: expected {{\"prefixes\": [[torch prefix, paddle prefix], ...]}}")
        tensors = document.get("tensors", [])
        if not isinstance(tensors, list):
            raise ValueError(f"{where}: \"tensors\" is a list of rules")
        converters = document.get("converters", {})
        if not isinstance(converters, dict) or not all(isinstance(v, str) for v in converters.values()):
            raise ValueError(f"{where}: \"converters\" is {{class name: \"module:function\"}}")
        return cls([(a, b) for a, b in rules], source=where,
                   tensors=[TensorRule.parse(item, f"{where}: tensors") for item in tensors],
                   converters=dict(converters), compare=CompareSpec.parse(document, where))

    def _rule(self, torch_name: str) -> int | None:
        """The index of the first rule matching ``torch_name``, or None."""
        for index, (old, _) in enumerate(self.prefixes):
            if torch_name.startswith(old) or (old.endswith(".") and torch_name == old[:-1]):
                return index
        return None

    def layer(self, torch_name: str) -> str:
        """The Paddle name of a torch layer (module) name."""
        index = self._rule(torch_name)
        if index is None:
            return torch_name
        old, new = self.prefixes[index]
        if torch_name == old[:-1] and old.endswith("."):
            return new[:-1] if new.endswith(".") else new
        return new + torch_name[len(old):]

    def check(self, torch_module) -> None:
        """A ``ValueError`` naming every rule that no module name of ``torch_module`` selects
        (a rule shadowed by an earlier one selects nothing either), with the closest module name."""
        import difflib

        names = [name for name, _ in torch_module.named_modules() if name]
        used = {self._rule(name) for name in names}
        unused = []
        for index, (old, new) in enumerate(self.prefixes):
            if index not in used:
                close = difflib.get_close_matches(old.rstrip("."), names, n=1)
                unused.append(f"[{old!r}, {new!r}]" + (f" (closest module: {close[0]!r})" if close else ""))
        if unused:
            raise ValueError(f"{self.source}: {'; '.join(unused)} match{'es' if len(unused) == 1 else ''} "
                             "no module of the torch model")

    def tensor(self, torch_key: str) -> str | None:
        """The Paddle state-dict key of a torch state-dict key; None when it has no counterpart."""
        owner, _, leaf = torch_key.rpartition(".")
        if leaf in _DROPPED:
            return None
        leaf = _STATISTICS.get(leaf, leaf)
        return f"{self.layer(owner)}.{leaf}" if owner else leaf


@dataclass
class Conversion:
    """Torch tensors -> Paddle tensors: the keys on each side, what converts them (``how``: the
    converter's class name, "rule" or "default") and ``apply``, torch arrays in ``torch_keys``
    order -> Paddle arrays in ``paddle_keys`` order (also used on gradients)."""

    torch_keys: tuple[str, ...]
    paddle_keys: tuple[str, ...]
    how: str
    apply: Callable[[list[np.ndarray]], list[np.ndarray]]
    # A Linear weight, stored (out, in) by torch and (in, out) by Paddle.
    transpose: bool = False

    @property
    def torch_key(self) -> str:
        return self.torch_keys[0]

    @property
    def paddle_key(self) -> str:
        return self.paddle_keys[0]


def is_linear_weight(torch_module, key: str) -> bool:
    """Whether the state-dict ``key`` is a ``torch.nn.Linear`` weight (stored transposed in Paddle)."""
    import torch

    owner, _, leaf = key.rpartition(".")
    module = torch_module.get_submodule(owner) if owner else torch_module
    return leaf == "weight" and isinstance(module, torch.nn.Linear)


def _numpy(tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def _class_conversion(key: str, module, converter, how: str, paddle_prefix: str,
                      array: np.ndarray) -> Conversion:
    """The conversion of one tensor ``key`` that ``module`` owns, by its class converter (run once
    on ``array`` to learn the Paddle names)."""
    local = key.rpartition(".")[2]
    try:
        names = list(converter(local, array, module))
    except Exception as err:
        raise ValueError(f"the {how} converter on torch {key}: {type(err).__name__}: {err}") from err

    def apply(arrays: list[np.ndarray]) -> list[np.ndarray]:
        out = converter(local, arrays[0], module)
        return [out[n] for n in names]

    paddle_keys = tuple(f"{paddle_prefix}.{n}" if paddle_prefix else n for n in names)
    return Conversion((key,), paddle_keys, how, apply, transpose=how == "Linear" and local == "weight")


def registered_converters(torch_module, name_map: NameMap) -> dict[str, Callable]:
    """The map file's converters by class name, loaded; one that names no class of the model is a
    ``ValueError`` naming it."""
    present = {name for m in torch_module.modules() for name in class_names(m)}
    converters = {}
    for cls_name, spec in name_map.converters.items():
        if cls_name not in present:
            raise ValueError(f"{name_map.source}: converters: {cls_name!r} is no class of the torch model's modules")
        converters[cls_name] = load_function(spec, f"{name_map.source}: converters: {cls_name}")
    return converters


def plan_conversion(torch_module, paddle_layer, name_map: NameMap) -> tuple[list[Conversion], list[str]]:
    """The conversions and the dropped torch keys; raises ``KeyError`` naming every key
    that is not accounted for (and ``ValueError`` for a rule that matches nothing) before
    anything is copied."""
    torch_state = torch_module.state_dict()
    paddle_state = paddle_layer.state_dict()
    modules = dict(torch_module.named_modules())
    registered = registered_converters(torch_module, name_map)
    conversions, dropped, problems = [], [], []
    consumed: set[str] = set()
    for rule in name_map.tensors:
        absent = [k for k in rule.torch if k not in torch_state]
        if absent:
            raise ValueError(f"{name_map.source}: tensor rule {list(rule.torch)} -> {list(rule.paddle)}: "
                             f"no torch key {absent[0]!r}")
        conversions.append(Conversion(rule.torch, rule.paddle, "rule", rule.apply))
        consumed.update(rule.torch)
    for key, tensor in torch_state.items():
        if key in consumed:
            continue
        owner = key.rpartition(".")[0]
        converter, how = converter_for(modules[owner], registered)
        conversion = _class_conversion(key, modules[owner], converter, how, name_map.layer(owner) if owner else "",
                                       _numpy(tensor))
        if conversion.paddle_keys:
            conversions.append(conversion)
        else:
            dropped.append(key)
    # Paddle may hold one tensor under several keys (an LSTM's ``weight_ih_l0`` is also
    # ``0.cell_fw.weight_ih``): filling one fills them all.
    filled: set[int] = set()
    for c in conversions:
        try:
            arrays = c.apply([_numpy(torch_state[k]) for k in c.torch_keys])
        except ValueError as err:
            raise ValueError(f"{name_map.source}: {err}") from None
        for key, array in zip(c.paddle_keys, arrays):
            if key not in paddle_state:
                problems.append(f"torch {', '.join(c.torch_keys)} -> paddle {key}: no such Paddle key")
            elif tuple(array.shape) != tuple(paddle_state[key].shape):
                shapes = ", ".join(f"{tuple(torch_state[k].shape)}" for k in c.torch_keys)
                problems.append(f"torch {', '.join(c.torch_keys)} {shapes}{' transposed' if c.transpose else ''} "
                                f"-> {tuple(array.shape)} vs paddle {key} {tuple(paddle_state[key].shape)}: "
                                "shapes differ")
            else:
                filled.add(id(paddle_state[key]))
    unfilled = [k for k, v in paddle_state.items() if id(v) not in filled]
    if unfilled:
        problems.append(f"paddle keys no torch key fills: {unfilled[:8]}{' ...' if len(unfilled) > 8 else ''}")
    if problems:
        raise KeyError("weights do not map one to one: " + "; ".join(problems[:8]) +
                       (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))
    return conversions, dropped


def convert_arrays(conversions: Sequence[Conversion], arrays: dict[str, Optional[np.ndarray]]) -> dict:
    """Paddle key -> array (or None) for every conversion whose torch keys are all in
    ``arrays``: the converted array, None when one of its torch arrays is None (gradients)."""
    out: dict[str, Optional[np.ndarray]] = {}
    for c in conversions:
        if not all(k in arrays for k in c.torch_keys):
            continue
        values = [arrays[k] for k in c.torch_keys]
        converted = [None] * len(c.paddle_keys) if any(v is None for v in values) else c.apply(values)
        out.update(zip(c.paddle_keys, converted))
    return out


def carry_weights(torch_module, paddle_layer, name_map: NameMap) -> tuple[list[Conversion], list[str]]:
    """Copy every torch tensor into its Paddle counterpart (see `plan_conversion`), in the
    Paddle tensor's dtype; returns the conversions and the dropped torch keys."""
    conversions, dropped = plan_conversion(torch_module, paddle_layer, name_map)
    torch_state = torch_module.state_dict()
    paddle_state = paddle_layer.state_dict()
    values = convert_arrays(conversions, {k: _numpy(v) for k, v in torch_state.items()})
    for key, array in values.items():
        target = paddle_state[key]
        target.set_value(np.ascontiguousarray(array).astype(_numpy_dtype(target)))
    return conversions, dropped


def _numpy_dtype(paddle_tensor) -> np.dtype:
    return np.dtype(str(paddle_tensor.dtype).replace("paddle.", ""))
