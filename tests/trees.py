"""Equality of nested training state (checkpoints, optimizer and sampler dicts) for the tests."""
from __future__ import annotations

import numpy as np


def assert_same_tree(a, b, where: str = "") -> None:
    """Equal nested dicts, lists and tuples; numpy arrays bit for bit; ``where`` names the path."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys differ: {set(a) ^ set(b)}"
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
