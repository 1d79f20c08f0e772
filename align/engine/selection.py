"""What is compared, layer by layer: which modules are hooked on each side and how their outputs are read.

By default every leaf module is compared. A map file changes that with

- ``"ignore"``: module names (torch's or Paddle's; a name covers what is under it) not compared;
- ``"ignore_classes"``: class names (either framework's, e.g. ``"Dropout"``) not compared;
- ``"compare_at"``: torch modules compared as a whole, their children not (built in for
  torch's ``MultiheadAttention``, which uses its weights functionally: its ``out_proj`` is
  never called, while Paddle's calls four Linear layers);
- ``"outputs"``: adapters by torch module name (``"output"``: the models' own outputs), per
  side: an index picks one element, a list of indices picks and reorders, ``"drop_none"``
  drops the Nones; every adapted output then drops its Nones and a single element stands for
  itself (torch's ``(out, None)`` is ``out``).

Two rules need no map: a torch module that owns parameters directly and also has children
(``x + self.scale * self.fc(x)``) is compared too, so a fault in its own parameters is named
at it and not at the next leaf; and a Paddle layer that stands for a compared torch module is
compared as a whole (an ``LSTM``, a leaf in torch, has cells below it in Paddle).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional


def _names_list(value: Any, key: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: {key!r} is a list of names")
    return list(value)


def _adapter_spec(value: Any, where: str) -> Any:
    if value == "drop_none" or isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return value
    raise ValueError(f"{where}: {value!r}: an adapter is an index, a list of indices or \"drop_none\"")


def adapter(spec: Any) -> Callable[[Any], Any]:
    """The function an adapter spec stands for (None: normalising only); its result drops its
    Nones and a one-element result stands for its element."""
    def adapt(output: Any) -> Any:
        if isinstance(output, (tuple, list)):
            if isinstance(spec, int):
                output = output[spec]
            elif isinstance(spec, list):
                output = [output[i] for i in spec]
        if isinstance(output, (tuple, list)):
            output = [o for o in output if o is not None]
            if len(output) == 1:
                output = output[0]
        return output

    return adapt


@dataclass
class CompareSpec:
    """The map file's comparison keys (see the module docstring)."""

    KEYS = ("ignore", "ignore_classes", "compare_at", "outputs")

    ignore: list[str] = field(default_factory=list)
    ignore_classes: list[str] = field(default_factory=list)
    compare_at: list[str] = field(default_factory=list)
    # torch module name (or "output") -> {"torch": spec, "paddle": spec}
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "name map"

    @classmethod
    def parse(cls, document: dict, where: str) -> "CompareSpec":
        outputs = document.get("outputs", {})
        if not isinstance(outputs, dict) or not all(
                isinstance(v, dict) and set(v) <= {"torch", "paddle"} for v in outputs.values()):
            raise ValueError(f"{where}: \"outputs\" is {{torch module or \"output\": {{\"torch\": adapter, "
                             "\"paddle\": adapter}}}")
        return cls(_names_list(document.get("ignore", []), "ignore", where),
                   _names_list(document.get("ignore_classes", []), "ignore_classes", where),
                   _names_list(document.get("compare_at", []), "compare_at", where),
                   {name: {side: _adapter_spec(v, f"{where}: outputs: {name}") for side, v in sides.items()}
                    for name, sides in outputs.items()}, source=where)

    def output_adapter(self, side: str) -> Optional[Callable]:
        """The adapter of the models' own outputs on ``side`` ("torch" or "paddle"), or None."""
        sides = self.outputs.get("output")
        return adapter(sides.get(side)) if sides else None


def _under(name: str, roots) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots if r)


def _strictly_under(name: str, roots) -> bool:
    return any(name.startswith(r + ".") for r in roots if r)


@dataclass
class Selection:
    """The modules hooked on each side (names) and the output adapters by each side's name."""

    torch: list[str]
    paddle: list[str]
    torch_adapters: dict[str, Callable] = field(default_factory=dict)
    paddle_adapters: dict[str, Callable] = field(default_factory=dict)
    # What the report says of the selection: torch modules compared whole, parents compared
    # beside their children (they own parameters), modules left out.
    summary: dict[str, list[str]] = field(default_factory=dict)


def select(torch_model, paddle_model, layer_name: Callable[[str], str], spec: CompareSpec) -> Selection:
    """What `CompareSpec` and the two rules of the module docstring select; ``layer_name`` maps a
    torch module name to Paddle's. A name, class or adapter of ``spec`` that matches nothing is a
    ``ValueError`` naming it."""
    import torch

    t_modules = {n: m for n, m in torch_model.named_modules() if n}
    p_layers = {n: l for n, l in paddle_model.named_sublayers() if n}
    for name in spec.ignore:
        if name not in t_modules and name not in p_layers:
            raise ValueError(f"{spec.source}: ignore: {name!r} is no torch module and no Paddle layer")
    classes = {type(m).__name__ for m in t_modules.values()} | {type(l).__name__ for l in p_layers.values()}
    for name in spec.ignore_classes:
        if name not in classes:
            raise ValueError(f"{spec.source}: ignore_classes: {name!r} is no class of either model's modules")
    for key, names in (("compare_at", spec.compare_at), ("outputs", [n for n in spec.outputs if n != "output"])):
        for name in names:
            if name not in t_modules:
                raise ValueError(f"{spec.source}: {key}: {name!r} is no module of the torch model")

    whole = set(spec.compare_at) | {n for n, m in t_modules.items() if isinstance(m, torch.nn.MultiheadAttention)}
    ignored_t = set(spec.ignore) | {n for n in t_modules if layer_name(n) in spec.ignore}
    ignored_t |= {n for n, m in t_modules.items() if type(m).__name__ in spec.ignore_classes}
    chosen, covering = [], set()
    for name, module in t_modules.items():
        if _under(name, ignored_t) or _strictly_under(name, whole):
            continue
        leaf = next(module.children(), None) is None
        owns = next(module.parameters(recurse=False), None) is not None
        if leaf or name in whole or owns:
            chosen.append(name)
        if leaf or name in whole:
            # Its Paddle counterpart is compared as a whole, whatever it has below it.
            covering.add(layer_name(name))

    mapped = {layer_name(n) for n in chosen}
    ignored_p = set(spec.ignore) | {layer_name(n) for n in ignored_t}
    ignored_p |= {n for n, l in p_layers.items() if type(l).__name__ in spec.ignore_classes}
    paddle_names = []
    for name, layer in p_layers.items():
        if _under(name, ignored_p) or _strictly_under(name, covering):
            continue
        if name in mapped or next(iter(layer.children()), None) is None:
            paddle_names.append(name)

    adapters_t = {n: adapter(None) for n in whole}
    adapters_p = {layer_name(n): adapter(None) for n in whole}
    for name, sides in spec.outputs.items():
        if name == "output":
            continue
        adapters_t[name] = adapter(sides.get("torch"))
        adapters_p[layer_name(name)] = adapter(sides.get("paddle"))
    summary = {"compared_whole": sorted(n for n in whole if n in chosen),
               "compared_beside_children": [n for n in chosen if n not in whole and next(t_modules[n].children(), None)],
               "ignored": sorted(n for n in ignored_t if not _strictly_under(n, ignored_t))}
    return Selection(chosen, paddle_names, adapters_t, adapters_p, summary)
