"""A training run's configuration: the options that change what it computes, recorded in every
checkpoint, and what a resume does when its command line differs from them.

A resume under other options would silently continue a run that is not the one
recorded; so it is refused, in one line naming each differing option with both
values, unless ``--allow-config-change``, which continues with the new values
and records each change (iteration, option, old value, new value).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from common.arguments import format_size
from common.errors import InputError


def training_config(args: argparse.Namespace, cfg: dict[str, Any], *, epochs: int, base_lr: float,
                    scale: Sequence[int]) -> dict[str, Any]:
    """The effective value of each option that changes what training computes, spelled as on
    the command line (defaults resolved, paths absolute, ``--lr auto`` as the rate it gives).

    Not in it: --max-iters, --ckpt-interval-iters and --keep-checkpoints (when training stops,
    what is kept), --eval-interval and --eval-backend (when and with which library it is
    evaluated, identical numbers), --num-workers (a sample's augmentation is keyed by its
    epoch, not by the worker that loads it), --mmdet-log, --reports and --no-progress. The
    number of processes is compared on its own: the GHM state is per process. The initial
    weights are not read again on resume, but a run continued under other ones would be
    recorded as a run it is not.
    """
    opt = cfg["optimizer"]
    return {
        "--coco": _absolute(args.coco),
        "--epochs": epochs,
        "--batch-size": args.batch_size,
        "--lr": base_lr,
        "--warmup-iters": opt["warmup_iters"],
        "--milestones": ",".join(str(m) for m in opt["milestones"]),
        "--scale": format_size(scale),
        "--seed": args.seed,
        "--init": _absolute(args.init),
        "--init-backbone": _absolute(args.init_backbone),
    }


def changes_on_resume(state: dict[str, Any], config: dict[str, Any], source: str, allow: bool,
                      report: bool) -> list[dict[str, Any]]:
    """The run's recorded changes, with this command's added when it differs from the
    checkpoint's ``config``: an `InputError` naming each differing option with both values,
    unless ``allow``. ``report``: print the one stderr line saying what happens (rank 0)."""
    if "config" not in state:
        if report:
            print(f"{source}: the checkpoint does not record its training options (written by an "
                  "older version); resuming without comparing them with this command", file=sys.stderr)
        return []
    saved, changes = state["config"], list(state["config_changes"])
    differ = [option for option, value in config.items() if saved.get(option) != value]
    if not differ:
        return changes
    old = " ".join(f"{option} {_option_text(saved.get(option))}" for option in differ)
    new = " ".join(f"{option} {_option_text(config[option])}" for option in differ)
    if not allow:
        raise InputError(f"{source}: the run was trained with {old}; this command has {new} "
                         "(pass --allow-config-change to continue with the new values)")
    if report:
        print(f"[train] {source}: continuing at iteration {state['iter']} with {new} (trained with {old})",
              file=sys.stderr)
    return changes + [{"iter": int(state["iter"]), "option": option, "old": _option_text(saved.get(option)),
                       "new": _option_text(config[option])} for option in differ]


def _absolute(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def _option_text(value: Any) -> str:
    """A recorded option value as the command line writes it."""
    return "(not given)" if value is None else str(value)
