"""Any torch module and any Paddle layer as a pair of the forward stage (`align.forward.stage`).

    result = align_pair(torch_model, paddle_model, images, name_map=NameMap([("backbone.", "")]),
                        isolate=True, backward=True, reports=Path("reports"), stage="pair_resnet18")

`ModelPair` carries every torch tensor into its Paddle counterpart as the map file says,
strictly (`carry_weights`: prefixes, tensor rules, class converters; every rule must match
something), selects what is compared on each side (`align.engine.selection`), calls both
models on one array or on named arrays (keyword arguments, `align.pair.inputs`), and names
the outputs of a model that returns one tensor, or a tuple, list or dict of them
(``output``, ``output[0]``, ``output[name]``), after the map's output adapter. `BuilderPair` is the same pair from two
functions that build the models (``python -m align.forward --torch module:function
--paddle module:function``); its reference side can be cached, keyed by the torch
weights, the input and the builder's source.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from align.engine.compare import DEFAULT_MEAN_TOL, DEFAULT_REL_TOL, diff_arrays
from align.engine.converters import load_function
from align.engine.environment import environment_info, source_digest
from align.engine.report import StageResult, write_stage_report
from align.engine.selection import select
from align.engine.weights import NameMap, carry_weights, plan_conversion
from align.pair.inputs import call, floats_as, npz_inputs, seeded_inputs

PACKAGES = {"torch": ("torch",), "paddle": ("paddlepaddle", "paddlepaddle-gpu"), "numpy": ("numpy",),
            "reprod_log": ("reprod_log", "reprod-log")}


def named(value, prefix: str = "output") -> dict[str, Any]:
    """Named tensors of a model's output: one tensor, or a tuple/list/dict of them."""
    if isinstance(value, (tuple, list)):
        return {k: v for i, item in enumerate(value) for k, v in named(item, f"{prefix}[{i}]").items()}
    if isinstance(value, dict):
        return {k: v for name, item in value.items() for k, v in named(item, f"{prefix}[{name}]").items()}
    return {prefix: value}


class ModelPair:
    """Two models given as objects (see the module docstring).

    Args:
        torch_model, paddle_model: in the mode to compare (``eval()`` for inference).
        inputs: what both take: one array (e.g. ``(N, C, H, W)`` float32), passed positionally,
            or name -> array, passed as keyword arguments (ids, masks...).
        name_map: torch names -> Paddle names (prefix rules).
        carry: copy the torch weights into the Paddle model (False: the models hold equal
            weights already).
        stage, title: the report's name and title.
        code: modules whose source builds the torch model; given, the reference side can be
            cached (the key holds their digest), otherwise not.
        spill: the isolated run's records go to disk.
        positional: named inputs are passed positionally, in their order.
    """

    reference = "torch"

    def __init__(self, torch_model, paddle_model, inputs: Any, *, name_map: Optional[NameMap] = None,
                 carry: bool = True, stage: str = "pair", title: str = "", code: Sequence[str] = (),
                 spill: bool = False, positional: bool = False):
        self.name_map = name_map or NameMap()
        self.name_map.check(torch_model)
        # What is compared is checked before the weights are carried: a bad map leaves no model half-filled.
        self.selection = select(torch_model, paddle_model, self.name_map.layer, self.name_map.compare)
        if carry:
            conversions, dropped = carry_weights(torch_model, paddle_model, self.name_map)
        else:
            conversions, dropped = _planned(torch_model, paddle_model, self.name_map)
        # The gradients of --backward are compared through the same conversions.
        self.conversions = conversions
        self._adapt = {side: self.name_map.compare.output_adapter(side) for side in ("torch", "paddle")}
        self._torch_model, self.paddle_model, self.inputs = torch_model, paddle_model, inputs
        self.stage, self.code, self.spill, self.positional = stage, tuple(code), spill, positional
        self.title = title or f"{type(paddle_model).__name__} (Paddle) vs {type(torch_model).__name__} (torch)"
        self.meta = {"carried_tensors": len(conversions), "dropped_torch_keys": dropped,
                     "converted_by": dict(Counter(c.how for c in conversions)), **self.selection.summary}

    def torch_model(self):
        return self._torch_model

    def torch_outputs(self, model, inputs: Any) -> dict[str, Any]:
        import torch

        output = call(model, inputs, torch.from_numpy, self.positional)
        return named(self._adapt["torch"](output) if self._adapt["torch"] else output)

    def paddle_outputs(self, model, inputs: Any) -> dict[str, Any]:
        import paddle

        output = call(model, inputs, paddle.to_tensor, self.positional)
        return named(self._adapt["paddle"](output) if self._adapt["paddle"] else output)

    def reference_key(self) -> Optional[dict]:
        if not self.code:
            return None
        import torch

        weights = hashlib.sha256()
        for key, tensor in self._torch_model.state_dict().items():
            weights.update(key.encode())
            weights.update(np.ascontiguousarray(tensor.detach().cpu().numpy()).tobytes())
        return {"pair": self.stage, "torch_weights": weights.hexdigest(), "code": source_digest(*self.code),
                "inputs": _digest(self.inputs), "positional": self.positional,
                "torch": torch.__version__}

    @staticmethod
    def write_report(result: StageResult, reports: Path) -> StageResult:
        result.env = result.env or environment_info(PACKAGES)
        write_stage_report(result, reports)
        return result


def _planned(torch_model, paddle_model, name_map: NameMap):
    """The conversions the name map describes when the builders carried the weights themselves
    (``--no-carry``), for naming the gradients; none when the map does not describe them."""
    try:
        return plan_conversion(torch_model, paddle_model, name_map)
    except (KeyError, ValueError):
        return [], []


def _digest(inputs: Any) -> str:
    digest = hashlib.sha256()
    for name, array in (inputs.items() if isinstance(inputs, dict) else [("", inputs)]):
        digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def load_builder(spec: str, flag: str):
    """``"pkg.module:function"`` -> the function; a bad spec is a ``ValueError`` naming the option."""
    return load_function(spec, flag)


def build(spec: str, flag: str, dtype: str = "float32"):
    """The model the builder named by ``spec`` returns, built with ``dtype`` as the framework's default
    dtype; a builder that raises is a ``ValueError`` naming ``module:function`` and its exception
    (the traceback with ``-v``)."""
    import paddle
    import torch

    builder = load_builder(spec, flag)
    saved = torch.get_default_dtype(), paddle.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    paddle.set_default_dtype(dtype)
    try:
        model = builder()
    except Exception as err:
        raise ValueError(f"{flag} {spec}: the builder raised {type(err).__name__}: {err}") from err
    finally:
        torch.set_default_dtype(saved[0])
        paddle.set_default_dtype(saved[1])
    if dtype == "float64" and flag == "--torch":
        model = model.double()
    return model


def builder_pair(torch_spec: str, paddle_spec: str, *, name_map_file: Optional[Path], carry: bool,
                 shape: Optional[Sequence[int]], seed: int, stage: str, spill: bool,
                 input_specs: Sequence[str] = (), inputs_file: Optional[Path] = None,
                 dtype: str = "float32", positional: bool = False) -> ModelPair:
    """The pair two builder functions make, on the inputs of ``inputs_file`` (an ``.npz``), of
    ``input_specs`` (seeded, `align.pair.inputs`) or else seeded standard-normal of ``shape``;
    floating inputs and both models in ``dtype``. Cacheable, keyed by the builders' modules'
    source among the rest."""
    name_map = NameMap.from_json(name_map_file) if name_map_file else NameMap()
    if inputs_file is not None:
        inputs = npz_inputs(inputs_file)
    elif input_specs:
        inputs = seeded_inputs(input_specs, seed)
    else:
        inputs = np.random.default_rng(seed).standard_normal(tuple(shape)).astype(np.float32)
    inputs = floats_as(inputs, dtype) if isinstance(inputs, dict) else inputs.astype(dtype)
    torch_model = build(torch_spec, "--torch", dtype)
    paddle_model = build(paddle_spec, "--paddle", dtype)
    modules = sorted({torch_spec.partition(":")[0], paddle_spec.partition(":")[0]})
    pair = ModelPair(torch_model, paddle_model, inputs, name_map=name_map, carry=carry, stage=stage,
                     code=modules, spill=spill, positional=positional)
    pair.meta["dtype"] = dtype
    if dtype == "float64":
        pair.meta["float32_outputs_rel_max"] = float32_beside(torch_spec, paddle_spec, name_map, carry, inputs,
                                                              positional)
    return pair


def float32_beside(torch_spec: str, paddle_spec: str, name_map: NameMap, carry: bool, inputs: Any,
                   positional: bool = False) -> dict:
    """What the same pair gives in float32 (both built again, the floating inputs narrowed), for the
    report beside a float64 run: each output's max|diff| / max|ref|, unperturbed."""
    import paddle
    import torch

    narrowed = (floats_as(inputs, "float32") if isinstance(inputs, dict) else inputs.astype(np.float32))
    pair = ModelPair(build(torch_spec, "--torch"), build(paddle_spec, "--paddle"), narrowed, name_map=name_map,
                     carry=carry, positional=positional)
    with torch.no_grad(), paddle.no_grad():
        ours = pair.paddle_outputs(pair.paddle_model, narrowed)
        theirs = pair.torch_outputs(pair.torch_model(), narrowed)
    return {name: float(diff_arrays(name, theirs[name].numpy(), ours[name].numpy()).rel_max)
            for name in theirs if name in ours}


def align_pair(torch_model, paddle_model, inputs: np.ndarray, *, name_map: Optional[NameMap] = None,
               isolate: bool = False, backward: bool = False, carry: bool = True, seed: int = 0,
               rel_tol: float = DEFAULT_REL_TOL, mean_tol: float = DEFAULT_MEAN_TOL,
               perturb: Optional[str] = None, perturb_scale: float = 1e-3, spill: bool = False,
               reports: Path = Path("reports"), build_dir: Path = Path("build"), stage: str = "pair",
               title: str = "") -> StageResult:
    """Compare ``paddle_model`` with ``torch_model`` on ``inputs`` through the forward stage and
    write ``{stage}.json`` / ``{stage}.html`` (and reprod_log's files) into ``reports``."""
    from align.forward.stage import ForwardOptions, run_forward

    pair = ModelPair(torch_model, paddle_model, inputs, name_map=name_map, carry=carry, stage=stage, title=title,
                     spill=spill)
    opts = ForwardOptions(seed=seed, rel_tol=rel_tol, mean_tol=mean_tol, perturb=perturb,
                          perturb_scale=perturb_scale, isolate=isolate, backward=backward, spill=spill,
                          reports=Path(reports), build_dir=Path(build_dir))
    return run_forward(opts, pair)
