"""Reading Paddle weights and training checkpoints without running code from the file.

``paddle.load`` is ``pickle.load``: a ``.pdparams`` whose pickle carries a
``__reduce__`` payload runs it while loading. Files a user hands in
(``--init``, ``--resume``, ``--weights``, ``R50=``) are read here instead, by
an unpickler whose ``find_class`` admits only the types this project's files
and ``paddle.save``'s state dicts contain:

* containers and scalars, which pickle builds without looking up a class
  (dict, list, tuple, set, str, bytes, int, float, bool, None);
* ``collections.OrderedDict``;
* numpy arrays, dtypes and scalars (``_reconstruct``, ``_frombuffer``,
  ``ndarray``, ``dtype``, ``scalar``, the ``numpy.dtypes`` classes) under
  numpy 1.x and 2.x module names;
* ``_codecs.encode``, with which pickle protocols below 3 spell bytes.

Any other global (``os.system``, ``builtins.eval``, a class with
``__reduce__``...) stops the load with :class:`UnsafeFileError` naming the
file and the refused global, before anything is called. Object arrays only
hold what the same unpickler built, so they cannot smuggle a call either.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, Iterable

__all__ = ["UnsafeFileError", "UnreadableFileError", "load", "loads", "STATE_DICT_GLOBALS"]

# (module, name) pairs a state dict or a training checkpoint may name.
STATE_DICT_GLOBALS = frozenset({
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
})


class UnsafeFileError(ValueError):
    """A pickle names a global outside the allowed set; nothing from it was run."""


class UnreadableFileError(ValueError):
    """A file is missing, truncated or not a pickle at all."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str, allowed: frozenset):
        super().__init__(file)
        self._source = source
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed or (module.startswith("numpy.dtypes") and
                                               name.endswith("DType")):
            return super().find_class(module, name)
        raise UnsafeFileError(f"{self._source}: refused to unpickle {module}.{name} (only arrays, numbers "
                              "and containers are loaded, nothing from the file was run)")


def loads(data: bytes, source: str = "<bytes>",
          extra_globals: Iterable[tuple[str, str]] = ()) -> Any:
    """Unpickle ``data`` admitting only :data:`STATE_DICT_GLOBALS` (plus ``extra_globals``).

    Raises :class:`UnsafeFileError` for any other global and
    :class:`UnreadableFileError` for data that is not a complete pickle;
    both name ``source``.
    """
    allowed = STATE_DICT_GLOBALS | frozenset(extra_globals)
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source, allowed).load()
    except UnsafeFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, ImportError, MemoryError) as err:
        cause = "truncated" if isinstance(err, EOFError) else f"{type(err).__name__}: {err}"
        raise UnreadableFileError(f"{source}: not a readable weights or checkpoint file ({cause})") from None


# paddle.save adds this table of structured names to a state dict; paddle.load drops it.
PADDLE_NAME_TABLE = "StructuredToParameterName@@"


def load(path: str | os.PathLike, extra_globals: Iterable[tuple[str, str]] = ()) -> Any:
    """:func:`loads` of the file at ``path``, as ``paddle.load`` returns it with
    ``return_numpy=True`` (a state dict loses ``paddle.save``'s name table); a missing or
    unreadable file is an :class:`UnreadableFileError` naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UnreadableFileError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UnreadableFileError(f"{path}: is a folder, not a file") from None
    except OSError as err:
        raise UnreadableFileError(f"{path}: cannot read ({err.strerror or err})") from None
    obj = loads(data, str(path), extra_globals)
    if isinstance(obj, dict):
        obj.pop(PADDLE_NAME_TABLE, None)
    return obj
