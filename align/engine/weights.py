"""A torch module's weights carried over to a Paddle layer by name, with every key accounted for.

Names are rewritten by a `NameMap`: an ordered list of prefix rules (the first
rule whose torch prefix starts a name replaces it; a name no rule matches is
kept). A rule whose torch prefix ends in a dot names a module: it also matches
that module itself (``"fc."`` matches ``fc`` as well as ``fc.weight``). A rule
that matches no torch module of the model is an error (`NameMap.check`): a
misspelt rule would otherwise leave the names it meant unmapped without a word. What differs between the two frameworks for every model is added here:

- BatchNorm statistics: torch ``running_mean`` / ``running_var`` are Paddle's
  ``_mean`` / ``_variance``; torch's ``num_batches_tracked`` has no Paddle
  counterpart and is dropped (and listed as dropped);
- Linear weights: torch stores ``(out, in)``, Paddle ``(in, out)``: transposed.

The conversion is strict: a torch key whose Paddle name does not exist, a
Paddle key nothing fills, or a shape that differs after the transposition is
an error that names the keys, before anything is copied.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

_STATISTICS = {"running_mean": "_mean", "running_var": "_variance"}
_DROPPED = ("num_batches_tracked",)


@dataclass
class NameMap:
    """Torch names -> Paddle names by ordered prefix rules ``(torch prefix, paddle prefix)``."""

    prefixes: Sequence[tuple[str, str]] = field(default_factory=list)

    # Where the rules came from (a file), named by the errors about them.
    source: str = "name map"

    @classmethod
    def from_json(cls, path: str | Path) -> "NameMap":
        """``{"prefixes": [["backbone.", ""], ["pool", "avgpool"]]}``; a malformed file is a
        ``ValueError`` naming it."""
        path = Path(path)
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"--map {path}: cannot read a JSON name map ({err})") from None
        rules = document.get("prefixes") if isinstance(document, dict) else None
        if not isinstance(rules, list) or not all(
                isinstance(r, list) and len(r) == 2 and all(isinstance(p, str) for p in r) for r in rules):
            raise ValueError(f"--map {path}: expected {{\"prefixes\": [[torch prefix, paddle prefix], ...]}}")
        return cls([(a, b) for a, b in rules], source=f"--map {path}")

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
    """One tensor carried over: its two names and whether it is transposed on the way."""

    torch_key: str
    paddle_key: str
    transpose: bool


def is_linear_weight(torch_module, key: str) -> bool:
    """Whether the state-dict ``key`` is a ``torch.nn.Linear`` weight (stored transposed in Paddle)."""
    import torch

    owner, _, leaf = key.rpartition(".")
    module = torch_module.get_submodule(owner) if owner else torch_module
    return leaf == "weight" and isinstance(module, torch.nn.Linear)


def plan_conversion(torch_module, paddle_layer, name_map: NameMap) -> tuple[list[Conversion], list[str]]:
    """The conversions and the dropped torch keys; raises ``KeyError`` naming every key
    that is not accounted for (and ``ValueError`` for shapes) before anything is copied."""
    torch_state = torch_module.state_dict()
    paddle_state = paddle_layer.state_dict()
    conversions, dropped, problems = [], [], []
    filled: set[str] = set()
    for key, tensor in torch_state.items():
        target = name_map.tensor(key)
        if target is None:
            dropped.append(key)
            continue
        if target not in paddle_state:
            problems.append(f"torch {key} -> paddle {target}: no such Paddle key")
            continue
        transpose = is_linear_weight(torch_module, key)
        shape = tuple(tensor.shape)[::-1] if transpose else tuple(tensor.shape)
        if shape != tuple(paddle_state[target].shape):
            problems.append(f"torch {key} {tuple(tensor.shape)}{' transposed' if transpose else ''} vs "
                            f"paddle {target} {tuple(paddle_state[target].shape)}: shapes differ")
            continue
        conversions.append(Conversion(key, target, transpose))
        filled.add(target)
    unfilled = [k for k in paddle_state if k not in filled]
    if unfilled:
        problems.append(f"paddle keys no torch key fills: {unfilled[:8]}{' ...' if len(unfilled) > 8 else ''}")
    if problems:
        raise KeyError("weights do not map one to one: " + "; ".join(problems[:8]) +
                       (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))
    return conversions, dropped


def carry_weights(torch_module, paddle_layer, name_map: NameMap) -> tuple[list[Conversion], list[str]]:
    """Copy every torch tensor into its Paddle counterpart (see `plan_conversion`), in the
    Paddle tensor's dtype; returns the conversions and the dropped torch keys."""
    conversions, dropped = plan_conversion(torch_module, paddle_layer, name_map)
    torch_state = torch_module.state_dict()
    paddle_state = paddle_layer.state_dict()
    values: dict[str, Any] = {}
    for c in conversions:
        array = torch_state[c.torch_key].detach().cpu().numpy()
        array = array.T if c.transpose else array
        values[c.paddle_key] = np.ascontiguousarray(array).astype(_numpy_dtype(paddle_state[c.paddle_key]))
    paddle_layer.set_state_dict(values)
    return conversions, dropped


def _numpy_dtype(paddle_tensor) -> np.dtype:
    return np.dtype(str(paddle_tensor.dtype).replace("paddle.", ""))
