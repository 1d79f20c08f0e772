"""Build mmdet 3.3.0's GHM RetinaNet from the config file inside the mmdet package.

Nothing here re-implements mmdet: the model comes from mmdet's registry and
mmdet's own config, with only the pretrained-backbone download switched off.
The seeded default checkpoint is produced by that same model, in mmdet's
checkpoint format ``{'meta': ..., 'state_dict': ...}``.
"""
from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from pathlib import Path

import torch

from common.atomic_write import atomic_write

CONFIG_RELPATH = "configs/ghm/retinanet_r50_fpn_ghm-1x_coco.py"


def config_path() -> Path:
    """The GHM config shipped inside the installed mmdet package (``mmdet/.mim``)."""
    import mmdet

    path = Path(mmdet.__file__).parent / ".mim" / CONFIG_RELPATH
    if not path.is_file():
        raise FileNotFoundError(f"mmdet {mmdet.__version__} does not ship {CONFIG_RELPATH} "
                                f"(looked in {path})")
    return path


def load_config():
    """mmengine ``Config`` of the reference, with pretrained init switched off."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(config_path()))
    cfg.model.backbone.init_cfg = None
    return cfg


def quiet_mmengine() -> None:
    """Keep mmengine's per-parameter initialisation log out of the output."""
    from mmengine.logging import MMLogger

    MMLogger.get_current_instance().setLevel(logging.WARNING)


def build_reference(checkpoint: str | os.PathLike | None = None, seed: int = 0):
    """mmdet ``RetinaNet`` with GHM losses, in eval mode.

    Weights come from ``checkpoint`` when given (strict: every key must match),
    else from mmdet's own initialisation under ``torch.manual_seed(seed)``.
    """
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    quiet_mmengine()
    cfg = load_config()
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    if checkpoint is not None:
        state_dict = load_mmdet_state_dict(checkpoint)
        result = model.load_state_dict(state_dict, strict=False)
        problems = []
        if result.missing_keys:
            problems.append(f"missing keys: {sorted(result.missing_keys)}")
        if result.unexpected_keys:
            problems.append(f"unexpected keys: {sorted(result.unexpected_keys)}")
        if problems:
            raise KeyError(f"{checkpoint}: does not fit mmdet's GHM RetinaNet; " + "; ".join(problems))
    model.eval()
    return model


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The raw checkpoint object, loaded safely (tensors and plain containers only).

    Raises ``FileNotFoundError`` or ``ValueError`` with a one-line message
    naming ``path``; a file that names any other global is refused by
    ``torch.load(weights_only=True)`` before anything from it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for non-checkpoints
        raise ValueError(_load_failure(path, err)) from None


def _load_failure(path: Path, err: Exception) -> str:
    """One line for a failed ``torch.load``: the refused global, or the first line of torch's reason."""
    text = str(err)
    refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if refused:
        return (f"{path}: refused to load {refused.group(1)} (torch.load with weights_only=True "
                "admits only tensors and containers; nothing from the file was run)")
    if "Weights only load failed" in text:
        reason = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
        detail = reason.group(1).strip() if reason else "not a plain state dict"
        return f"{path}: refused by torch.load with weights_only=True ({detail}); nothing from the file was run"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    return f"{path}: not a loadable PyTorch checkpoint ({first})"


def load_mmdet_state_dict(path: str | os.PathLike) -> "OrderedDict[str, torch.Tensor]":
    """The ``state_dict`` of an mmdet checkpoint (a bare state dict is accepted too)."""
    obj = load_checkpoint(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    state_dict = obj.get("state_dict", obj)
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f"{path}: has no 'state_dict' of tensors")
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: state_dict entries that are not tensors: {bad[:10]}")
    # mmdet's Runner may save with a 'module.' prefix from DistributedDataParallel.
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v)
                       for k, v in state_dict.items())


def randomize_statistics(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every BatchNorm random running statistics and affine parameters, and
    every convolution bias a random offset, in place (seeded).

    Defaults (mean 0, variance 1, zero biases) would let a converter that swaps
    mean and variance, or drops a bias, pass alignment unnoticed.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                module.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=gen))
                module.bias.copy_(0.1 * torch.randn(c, generator=gen))
                module.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (1,), generator=gen)))
            elif isinstance(module, torch.nn.Conv2d) and module.bias is not None:
                module.bias.add_(0.01 * torch.randn(module.bias.shape, generator=gen))
    return model


def synthesize_checkpoint(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a seeded checkpoint of the reference model in mmdet's format.

    mmdet's initialisation under ``seed``, then `randomize_statistics`.
    """
    import mmdet

    model = build_reference(seed=seed)
    randomize_statistics(model, seed + 1)
    checkpoint = {
        "meta": {
            "mmdet_version": mmdet.__version__,
            "config": CONFIG_RELPATH,
            "seed": seed,
            "origin": "synthetic seeded weights (torch_ref.synthesize_checkpoint)",
        },
        "state_dict": OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items()),
    }
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
    return Path(path)
