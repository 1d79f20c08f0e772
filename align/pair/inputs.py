"""A pair's inputs: one seeded float array of ``--shape``, named seeded arrays of ``--input`` specs, or
the arrays of an ``.npz`` file (``--inputs``).

A spec is ``name:dtype:shape[:low..high]``:

    --input ids:int64:2x16:0..1000     integers drawn uniformly from [low, high)
    --input mask:bool:2x16             True / False, each with probability 1/2
    --input x:float32:2x8x32           standard normal (uniform in [low, high) with a range)

Named inputs are passed as keyword arguments, in the order given (or positionally in that order:
`call`); arrays of an
``.npz`` file too (``np.load(..., allow_pickle=False)``: a file is never unpickled). With
``dtype`` float64 every floating input is widened (integers and booleans kept).
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from common.errors import InputError

DTYPES = ("float16", "float32", "float64", "int32", "int64", "bool")

Inputs = dict  # name -> ndarray, passed as keyword arguments in this order


def parse_spec(spec: str) -> tuple[str, str, tuple[int, ...], Optional[tuple[float, float]]]:
    """``"ids:int64:2x16:0..1000"`` -> ``("ids", "int64", (2, 16), (0, 1000))``; an `InputError` naming
    the spec otherwise."""
    parts = spec.split(":")
    where = f"--input {spec}"
    if len(parts) not in (3, 4) or not parts[0].isidentifier():
        raise InputError(f"{where}: expected name:dtype:shape[:low..high], e.g. ids:int64:2x16:0..1000")
    name, dtype, shape_text = parts[:3]
    if dtype not in DTYPES:
        raise InputError(f"{where}: dtype {dtype!r} is none of {', '.join(DTYPES)}")
    try:
        shape = tuple(int(d) for d in shape_text.split("x"))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise InputError(f"{where}: shape {shape_text!r} is not positive integers joined by x, e.g. 2x16")
    bounds = None
    if len(parts) == 4:
        low, sep, high = parts[3].partition("..")
        try:
            bounds = (float(low), float(high))
        except ValueError:
            sep = ""
        if not sep or bounds[0] >= bounds[1]:
            raise InputError(f"{where}: range {parts[3]!r} is not low..high with low < high")
        if dtype == "bool":
            raise InputError(f"{where}: a bool input takes no range")
    elif dtype.startswith("int"):
        raise InputError(f"{where}: an integer input needs its range, e.g. {name}:{dtype}:{shape_text}:0..1000")
    return name, dtype, shape, bounds


def seeded_inputs(specs: Sequence[str], seed: int) -> Inputs:
    """The arrays the specs describe, drawn from one generator seeded ``seed`` in the specs' order."""
    rng = np.random.default_rng(seed)
    arrays: Inputs = {}
    for spec in specs:
        name, dtype, shape, bounds = parse_spec(spec)
        if name in arrays:
            raise InputError(f"--input {spec}: a second input named {name!r}")
        if dtype == "bool":
            arrays[name] = rng.random(shape) < 0.5
        elif dtype.startswith("int"):
            arrays[name] = rng.integers(int(bounds[0]), int(bounds[1]), size=shape).astype(dtype)
        elif bounds:
            arrays[name] = rng.uniform(bounds[0], bounds[1], size=shape).astype(dtype)
        else:
            arrays[name] = rng.standard_normal(shape).astype(dtype)
    return arrays


def npz_inputs(path: Path) -> Inputs:
    """The arrays of an ``.npz`` file by name, in the file's order, read without unpickling."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: np.array(data[name]) for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise InputError(f"--inputs {path}: cannot read the arrays of an .npz file ({' '.join(str(err).split())})") \
            from None


def one_way(shape: Optional[str], specs: Optional[Sequence[str]], inputs_file: Optional[Path]) -> None:
    """An `InputError` when the inputs are given more than one way (``--shape``, ``--input``, ``--inputs``)."""
    given = [flag for flag, value in (("--inputs", inputs_file), ("--input", specs), ("--shape", shape)) if value]
    if len(given) > 1:
        raise InputError(f"{' and '.join(given)}: give the inputs one way")


def floats_as(inputs: Inputs, dtype: str) -> Inputs:
    """Every floating array in ``dtype``; integers and booleans as they are."""
    return {k: v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v for k, v in inputs.items()}


def call(model, inputs: Any, to_tensor: Callable[[np.ndarray], Any], positional: bool = False):
    """``model`` on ``inputs``: one array positionally, a dict of them as keyword arguments (with
    ``positional``, positionally in the dict's order)."""
    if isinstance(inputs, dict):
        if positional:
            return model(*[to_tensor(v) for v in inputs.values()])
        return model(**{k: to_tensor(v) for k, v in inputs.items()})
    return model(to_tensor(inputs))

