"""Align any torch module with any Paddle layer: weights carried over by name, forward layer by
layer, backward, and each layer in isolation; one JSON and HTML report with the first divergence.

    result = align_pair(torch_model, paddle_model, images, name_map=NameMap([("backbone.", "")]),
                        isolate=True, backward=True, reports=Path("reports"), stage="pair_resnet18")

Steps, all on the engine (`align.engine`):

1. `carry_weights`: every torch tensor into its Paddle counterpart, strictly
   (and every rule of the name map selects some torch module).
2. Forward: the output(s) and every leaf layer's output (`TorchRecorder`,
   `PaddleComparer`; layer names through the name map), in execution order.
3. With ``backward``: the loss ``sum(output * R)`` for a seeded ``R`` of the
   output's shape on both sides; the gradient of every parameter is compared.
4. With ``isolate``: every leaf layer on the reference layer's recorded
   input (`isolated_forward`) and, with ``backward``, on its recorded output
   gradient too (`isolated_backward`). The isolated rows then decide the
   verdict (with the outputs); the accumulated rows are shown beside them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np

from align.engine.capture import PaddleComparer, TorchRecorder, perturb_parameter
from align.engine.compare import (DEFAULT_MEAN_TOL, DEFAULT_REL_TOL, TensorDiff, diff_arrays, first_failure,
                                  missing_row)
from align.engine.environment import environment_info
from align.engine.isolate import (TorchCallRecorder, isolated_backward, isolated_forward, isolation_tables,
                                  peak_memory_gb, spill_store)
from align.engine.report import Headline, StageResult, write_stage_report
from align.engine.weights import NameMap, carry_weights

PACKAGES = {"torch": ("torch",), "paddle": ("paddlepaddle", "paddlepaddle-gpu"), "numpy": ("numpy",),
            "reprod_log": ("reprod_log", "reprod-log")}


def _outputs(value, prefix: str = "output") -> dict:
    """Named tensors of a model's output: one tensor, or a tuple/list/dict of them."""
    if isinstance(value, (tuple, list)):
        return {k: v for i, item in enumerate(value) for k, v in _outputs(item, f"{prefix}[{i}]").items()}
    if isinstance(value, dict):
        return {k: v for name, item in value.items() for k, v in _outputs(item, f"{prefix}[{name}]").items()}
    return {prefix: value}


def align_pair(torch_model, paddle_model, inputs: np.ndarray, *, name_map: Optional[NameMap] = None,
               isolate: bool = False, backward: bool = False, carry: bool = True, seed: int = 0,
               rel_tol: float = DEFAULT_REL_TOL, mean_tol: float = DEFAULT_MEAN_TOL,
               perturb: Optional[str] = None, perturb_scale: float = 1e-3, spill: bool = False,
               reports: Path = Path("reports"), build_dir: Path = Path("build"), stage: str = "pair",
               title: str = "") -> StageResult:
    """Compare ``paddle_model`` with ``torch_model`` on ``inputs`` (an ``(N, C, H, W)`` array)
    and write ``{stage}.json`` / ``{stage}.html`` into ``reports``.

    Both models are used in the mode they are given (``eval()`` for inference
    layers). ``perturb`` adds noise to one Paddle parameter after the weights
    are carried over (the report must then name its layer). With ``spill`` the
    isolated run's records go to a temporary folder under ``build_dir/isolate``.
    """
    import paddle
    import torch

    name_map = name_map or NameMap()
    name_map.check(torch_model)
    conversions, dropped = carry_weights(torch_model, paddle_model, name_map) if carry else ([], [])
    if perturb:
        perturb_parameter(paddle_model, perturb, scale=perturb_scale, seed=seed)

    # Forward, accumulated: every leaf layer of the normal run.
    with torch.no_grad(), TorchRecorder(torch_model) as recorder:
        torch_out = _outputs(torch_model(torch.from_numpy(inputs)))
    reference = {_rename(name_map, key): value for key, value in recorder.records.items()}
    with paddle.no_grad(), PaddleComparer(paddle_model, reference, rel_tol=rel_tol, mean_tol=mean_tol) as comparer:
        paddle_out = _outputs(paddle_model(paddle.to_tensor(inputs)))
    layer_rows = comparer.rows
    output_rows = [diff_arrays(name, t.numpy(), paddle_out[name].numpy(), rel_tol=rel_tol, mean_tol=mean_tol)
                   for name, t in torch_out.items()]

    grad_rows: list[TensorDiff] = []
    if backward:
        grad_rows = _accumulated_gradients(torch_model, paddle_model, inputs, name_map, conversions, seed,
                                           rel_tol, mean_tol)

    isolated: list[TensorDiff] = []
    tables = []
    meta = {"input_shape": list(inputs.shape), "seed": seed, "carried_tensors": len(conversions),
            "dropped_torch_keys": dropped, "perturbed_parameter": perturb, "isolate": isolate,
            "backward": backward}
    if isolate:
        with spill_store(spill, build_dir / "isolate") as store:
            recorder = TorchCallRecorder(torch_model, store, grads=backward)
            with recorder:
                if backward:
                    _projected_loss(torch_model(torch.from_numpy(inputs)), seed).backward()
                else:
                    with torch.no_grad():
                        torch_model(torch.from_numpy(inputs))
            kinds = {_rename(name_map, c.key): c.kind for c in recorder.calls}
            forward_rows = isolated_forward(recorder.calls, store, paddle_model, name_map, rel_tol=rel_tol,
                                            mean_tol=mean_tol)
            backward_rows = (isolated_backward(recorder.calls, store, torch_model, paddle_model, name_map,
                                               rel_tol=rel_tol, mean_tol=mean_tol) if backward else [])
            meta["recorded_mb"] = round(store.nbytes / 2 ** 20, 1)
        isolated = forward_rows + backward_rows
        accumulated = layer_rows + [dataclasses.replace(r, name=f"{r.name[len('grad.'):]}.grad") for r in grad_rows]
        tables = isolation_tables(forward_rows, backward_rows, accumulated, kinds)
    meta["peak_memory_gb"] = round(peak_memory_gb(), 2)

    decisive = output_rows + (isolated if isolate else layer_rows + grad_rows)
    passed = first_failure(decisive) is None
    headline_rows = isolated if isolate else output_rows
    result = StageResult(
        stage=stage,
        title=title or f"{type(paddle_model).__name__} (Paddle) vs {type(torch_model).__name__} (torch)",
        passed=passed,
        tensors=output_rows + ([] if isolate else grad_rows),
        layers=isolated if isolate else layer_rows,
        thresholds={"rel_max": rel_tol, "mean_abs": mean_tol},
        meta=meta,
        env=environment_info(PACKAGES),
        extra_tables=tables,
        headline=Headline.worst(headline_rows, rel_tol,
                                "worst own error (isolated)" if isolate else "worst output rel"),
    )
    write_stage_report(result, reports)
    return result


def _rename(name_map: NameMap, key: str) -> str:
    """A torch call key (``layer``, ``layer#1``, ``layer[0]``) with its layer name mapped."""
    cut = min((i for i in (key.find("#"), key.find("[")) if i >= 0), default=len(key))
    return name_map.layer(key[:cut]) + key[cut:]


def _projected_loss(output, seed: int):
    """``sum(output * R)``, ``R`` seeded standard normal of the output's shape (first output)."""
    import torch

    first = next(iter(_outputs(output).values()))
    weights = np.random.default_rng(seed + 1).standard_normal(tuple(first.shape)).astype(np.float32)
    return (first * torch.from_numpy(weights).to(first.dtype)).sum()


def _accumulated_gradients(torch_model, paddle_model, inputs, name_map, conversions, seed, rel_tol, mean_tol):
    """Every parameter's gradient of the projected loss, normal backward on both sides."""
    import paddle
    import torch

    torch_model.zero_grad()
    _projected_loss(torch_model(torch.from_numpy(inputs)), seed).backward()
    paddle_model.clear_gradients()
    first = next(iter(_outputs(paddle_model(paddle.to_tensor(inputs))).values()))
    weights = np.random.default_rng(seed + 1).standard_normal(tuple(first.shape)).astype(np.float32)
    (first * paddle.to_tensor(weights).astype(first.dtype)).sum().backward()
    paddle_params = dict(paddle_model.named_parameters())
    transposed = {c.torch_key: c.transpose for c in conversions}
    rows = []
    for name, param in torch_model.named_parameters():
        if not param.requires_grad:
            continue
        target = name_map.tensor(name)
        ours = paddle_params.get(target)
        ref = None if param.grad is None else param.grad.numpy()
        if ref is not None and transposed.get(name):
            ref = ref.T
        got = None if ours is None or ours.grad is None else ours.grad.numpy()
        if ref is None or got is None:
            rows.append(missing_row(f"grad.{target}", reason="no gradient in " + ("torch" if ref is None else "paddle")))
            continue
        rows.append(diff_arrays(f"grad.{target}", ref, got, rel_tol=rel_tol, mean_tol=mean_tol))
    return rows
