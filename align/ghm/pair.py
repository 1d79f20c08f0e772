"""The GHM RetinaNet pair every stage aligns: mmdet's model and ours, same weights.

This is the toolkit's first client of the model-agnostic engine in ``align``:
it prepares the checkpoint (the seeded default, or ``--ckpt``), converts it,
and builds both models. Stages share it so they all start from one place.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from align.engine.options import build_dir_option, option, reports_option, seed_option
from common.digest import sha256_of

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_DIR = REPO_ROOT / "build"
# The FPN levels the head runs on, in order; losses and targets are named after them.
LEVELS = ("P3", "P4", "P5", "P6", "P7")


@dataclass
class Checkpoints:
    """An mmdet checkpoint and its Paddle conversion."""

    torch_path: Path
    paddle_path: Path
    sha256: str
    synthetic: bool


@dataclass
class GhmStageOptions:
    """The options every GHM stage takes (a stage's options extend these)."""

    ckpt: str | None = option(None, "mmdet checkpoint (default: the seeded synthetic one)")
    seed: int = seed_option()
    reports: Path = reports_option()
    build_dir: Path = build_dir_option(BUILD_DIR, "where the default checkpoint, its conversions and the tiny "
                                                  "COCO are made once (default %(default)s)")


def prepare_checkpoints(ckpt: str | None, seed: int, build_dir: Path = BUILD_DIR) -> Checkpoints:
    """Resolve the mmdet checkpoint (synthesizing the default) and convert it once.

    Conversions are cached under ``build_dir`` by the checkpoint's sha256.
    """
    from torch_ref.reference import synthesize_checkpoint
    from weights_convert.convert import mmdet_to_paddle

    synthetic = ckpt is None
    if synthetic:
        torch_path = build_dir / "default" / f"ghm_retinanet_seed{seed}.pth"
        if not torch_path.is_file():
            synthesize_checkpoint(torch_path, seed=seed)
    else:
        torch_path = Path(ckpt)
        if not torch_path.is_file():
            raise FileNotFoundError(f"CKPT not found: {torch_path}")
    sha = sha256_of(torch_path)
    paddle_path = build_dir / "converted" / f"{torch_path.stem}-{sha[:12]}.pdparams"
    if not paddle_path.is_file():
        mmdet_to_paddle(torch_path, paddle_path)
    return Checkpoints(torch_path, paddle_path, sha, synthetic)


def check_perturb(name: str | None) -> None:
    """``PERTURB``: a name no parameter of our detector has is refused before any work (a
    ``ValueError`` naming the option, the value and the closest names)."""
    if name is None:
        return
    from align.engine.capture import named_parameter
    from paddle_impl.config import get_config
    from paddle_impl.model.detector import RetinaNet

    try:
        named_parameter(RetinaNet.from_config(get_config()), name)
    except KeyError as err:
        raise ValueError(f"--perturb {name}: {err.args[0]}") from None


MODEL_DTYPES = ("float32", "float64")


def dtype_option():
    """``--dtype`` of a training stage: the precision of the run checked against the tolerances."""
    return option("float64", "precision of the run checked against the tolerances (default %(default)s)",
                  choices=MODEL_DTYPES)


def extra_dtype_option():
    """``--extra-dtype`` of a training stage: a second run reported beside the checked one."""
    return option("float32", "precision of a second run, measured and reported but not checked; 'none' or the "
                             "same as --dtype skips it (default %(default)s)", choices=MODEL_DTYPES + ("none",))


def extra_dtype(args) -> str | None:
    """The parsed ``--extra-dtype``, None for 'none'."""
    return None if args.extra_dtype == "none" else args.extra_dtype


def _check_dtype(dtype: str) -> None:
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype must be one of {MODEL_DTYPES}, got {dtype!r}")


def build_torch_model(ckpts: Checkpoints, dtype: str = "float32"):
    """mmdet's GHM RetinaNet with the checkpoint loaded, eval mode.

    ``dtype="float64"`` applies ``module.double()`` after loading: parameters
    and floating buffers (BN statistics, the GHM ``edges`` and ``acc_sum``)
    become float64; anchors and training targets stay float32 in mmdet.
    """
    from torch_ref.reference import build_reference

    _check_dtype(dtype)
    model = build_reference(ckpts.torch_path)
    return model.double() if dtype == "float64" else model


def build_paddle_model(ckpts: Checkpoints, dtype: str = "float32"):
    """Our RetinaNet with the converted checkpoint loaded strictly, eval mode.

    ``dtype="float64"`` casts parameters and buffers after loading, as
    `build_torch_model` does (``Layer.to(dtype=...)`` keeps the parameter
    objects and their ``stop_gradient`` flags).
    """
    from paddle_impl.engine import safe_load
    from paddle_impl.model.detector import RetinaNet

    _check_dtype(dtype)
    model = RetinaNet.from_config()
    state = safe_load.load(ckpts.paddle_path)
    expected = set(model.state_dict())
    if set(state) != expected:
        raise KeyError(f"{ckpts.paddle_path}: keys differ from the model: "
                       f"missing {sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)}")
    model.set_state_dict(state)
    if dtype != "float32":
        model.to(dtype=dtype)
    model.eval()
    return model


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """``"2x3x800x1344"`` -> ``(2, 3, 800, 1344)``: an image batch of the GHM stages."""
    from align.engine.cli import parse_shape as tensor_shape

    shape = tensor_shape(text)
    if len(shape) != 4 or shape[1] != 3:
        raise ValueError(f"--shape {text}: the GHM RetinaNet takes NxCxHxW with C = 3")
    return shape  # type: ignore[return-value]


def seeded_images(shape: tuple[int, int, int, int], seed: int) -> np.ndarray:
    """Normalized RGB images ``(N, 3, H, W)`` float32, as mmdet's data preprocessor
    makes them from seeded 8-bit pixels."""
    from paddle_impl.config import get_config

    pre = get_config()["data_preprocessor"]
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=shape).astype(np.float32)
    mean = np.asarray(pre["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(pre["std"], np.float32).reshape(1, 3, 1, 1)
    return (pixels - mean) / std
