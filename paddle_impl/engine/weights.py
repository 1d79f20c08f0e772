"""Model weights in and out of a Paddle detector, strictly and safely.

Files are read by :mod:`paddle_impl.engine.safe_load` (nothing in them runs);
a PyTorch checkpoint is converted by the separate ``weights_convert`` command
(:func:`convert_torch_checkpoint` runs it), so the model package never imports
torch.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import paddle

from paddle_impl.engine import checkpoint as ckpt
from paddle_impl.engine import safe_load
from common.errors import InputError

TORCH_SUFFIXES = (".pth", ".pt")


def convert_torch_checkpoint(path: str, flag: str, out_dir: str | os.PathLike) -> str:
    """``path`` itself, or, for an mmdet ``.pth``, its conversion to ``.pdparams`` in
    ``out_dir`` by ``python -m weights_convert mmdet-to-paddle`` (a separate process:
    the conversion needs torch and mmdet, the trainer neither)."""
    if not path.endswith(TORCH_SUFFIXES):
        return path
    if not Path(path).is_file():
        raise InputError(f"{flag} {path}: file not found")
    out = Path(out_dir) / (Path(path).stem + ".pdparams")
    proc = subprocess.run([sys.executable, "-m", "weights_convert", "mmdet-to-paddle", path, str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        reason = lines[-1].removeprefix("error: ") if lines else f"exit status {proc.returncode}"
        raise InputError(f"{flag} {reason}")
    return str(out)


def load_weights_file(path: str, flag: str) -> dict[str, np.ndarray]:
    """A whole-model state dict from a Paddle ``.pdparams`` or a training checkpoint ``.ckpt``
    (its rank-0 model), read without running code from the file."""
    if not Path(path).is_file():
        raise InputError(f"{flag} {path}: file not found")
    if path.endswith(".ckpt"):
        try:
            return ckpt.load_checkpoint(path)["model"]
        except ValueError as err:
            raise InputError(f"{flag} {err}") from None
    if path.endswith((".pth", ".pt")):
        raise InputError(f"{flag} {path}: a PyTorch checkpoint; convert it first "
                         "(python -m weights_convert mmdet-to-paddle), or give it on the command line")
    try:
        # Never paddle.load (pickle): a user's file must not run code.
        state = safe_load.load(path)
    except ValueError as err:
        raise InputError(f"{flag} {err}") from None
    if isinstance(state, dict) and state.get("format") == ckpt.FORMAT:
        return state["model"]
    if not isinstance(state, dict):
        raise InputError(f"{flag} {path}: expected a state dict, found {type(state).__name__}")
    return state


def load_weights(model: paddle.nn.Layer, state: dict[str, Any], source: str, prefix: str = "") -> None:
    """Set the parameters and buffers named ``prefix*`` from ``state``, strictly.

    Every model key under ``prefix`` must be present with the same shape,
    except the GHM buffers (a fresh model's zeros are kept when absent); a key
    the model does not have is an error. Raises :class:`InputError` naming
    ``source`` and the keys.
    """
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    optional = set(ckpt.GHM_BUFFER_KEYS) | {k.replace("acc_sum", "edges") for k in ckpt.GHM_BUFFER_KEYS}
    missing = sorted(k for k in own if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(f"{k}: {list(np.shape(state[k]))} vs {list(own[k].shape)}" for k in own
                   if k in state and list(np.shape(state[k])) != list(own[k].shape))
    if missing or unexpected or wrong:
        raise InputError(f"{source}: does not fit the model: missing {missing[:5]} ({len(missing)}), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)}), shape {wrong[:5]}")
    for key, tensor in own.items():
        if key in state:
            paddle.assign(paddle.to_tensor(np.asarray(state[key], dtype=tensor.numpy().dtype)), output=tensor)


def set_ghm_buffers(model: paddle.nn.Layer, buffers: dict[str, np.ndarray]) -> None:
    """Restore this process's GHM momentum buffers (``acc_sum`` of GHM-C and GHM-R)."""
    own = model.state_dict()
    for key in ckpt.GHM_BUFFER_KEYS:
        paddle.assign(paddle.to_tensor(np.asarray(buffers[key], dtype=np.float32)), output=own[key])
