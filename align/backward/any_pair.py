"""Any pair trained in lockstep: the backward stage of two models that functions build.

Both models take the same seeded input at every step and minimise the same loss,
``sum(output * R)`` over the first output (``R`` seeded, `align.forward.stage.projection`),
with SGD of the same learning rate, momentum, coupled weight decay and, optionally,
gradient clipping at the same global L2 norm: ``torch.optim.SGD`` with
``torch.nn.utils.clip_grad_norm_`` on one side, the project's torch-exact SGD and clipping
(`paddle_impl.engine.optimizer`) on the other. `align.engine.paired.train_in_lockstep`
compares every step's loss, gradient norm and learning rate, every gradient at step 1,
and every parameter and momentum buffer after the last step, under Paddle's names (the
pair's name map; Linear weights in Paddle's layout).

In float64 (the default, as the GHM backward stage checks) two correct implementations
agree to rounding; in float32 a deep network's gradients part by more than the bounds
(the frameworks' kernels round differently and a ReLU near zero flips), which the
forward stage's ``--isolate`` examines layer by layer instead.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from align.engine.cache import ReferenceCache, cache_key
from align.engine.compare import compare_named, first_failed_name
from align.engine.figures import loss_curves_png
from align.engine.paired import StepValues, train_in_lockstep, value_series
from align.engine.replay import RecordingSide, ReplaySide
from align.engine.report import Headline, StageResult
from align.engine.weights import NameMap, is_linear_weight
from align.forward.stage import paddle_projected_loss, torch_projected_loss
from align.pair.run import ModelPair, named

# Relative bounds per compared value, by precision: (step 1, later steps, final state). In
# float32 step 1 is one forward and backward and the updates compound rounding after it; in
# float64 two correct implementations agree to about 1e-11 (ResNet-18, 3 steps), so the bound
# catches what float32 would hide (a missing weight decay changes a parameter by ~1e-6).
TOLERANCES = {"float32": (1e-5, 1e-4, 1e-4), "float64": (1e-9, 1e-9, 1e-9)}


class TorchTraining:
    """The torch model as a `Side`: ``torch.optim.SGD`` and ``clip_grad_norm_``, values under Paddle's names."""

    name = "torch"

    def __init__(self, model, name_map: NameMap, *, lr: float, momentum: float, weight_decay: float,
                 clip: Optional[float], seed: int):
        import torch

        self.model, self.name_map, self.lr, self.clip, self.seed = model, name_map, lr, clip, seed
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    def train_step(self, batch: np.ndarray, after_backward: Optional[Callable[[], None]] = None) -> StepValues:
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        loss = torch_projected_loss(named(self.model(torch.from_numpy(batch))), self.seed)
        loss.backward()
        if after_backward is not None:
            after_backward()
        trained = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(trained, self.clip if self.clip else math.inf)
        self.optimizer.step()
        return StepValues({"loss": float(loss.detach())}, float(norm), self.lr)

    def _by_paddle_name(self, value: Callable[[str, Any], Any]) -> dict[str, np.ndarray]:
        out = {}
        for name, param in self.model.named_parameters():
            array = value(name, param)
            if array is None:
                continue
            array = array.detach().cpu().numpy()
            out[self.name_map.tensor(name)] = array.T if is_linear_weight(self.model, name) else array
        return out

    def gradients(self) -> dict[str, np.ndarray]:
        return self._by_paddle_name(lambda name, p: p.grad if p.requires_grad else None)

    def parameters(self) -> dict[str, np.ndarray]:
        return self._by_paddle_name(lambda name, p: p if p.requires_grad else None)

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        buffers = self._by_paddle_name(lambda name, p: self.optimizer.state.get(p, {}).get("momentum_buffer"))
        return {"momentum": buffers}


class PaddleTraining:
    """The Paddle model as a `Side`: the project's torch-exact SGD (`paddle_impl.engine.optimizer`)."""

    name = "paddle"

    def __init__(self, model, *, lr: float, momentum: float, weight_decay: float, clip: Optional[float], seed: int):
        from paddle_impl.engine.optimizer import SGD

        self.model, self.lr, self.clip, self.seed = model, lr, clip, seed
        self.optimizer = SGD(model, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def train_step(self, batch: np.ndarray, after_backward: Optional[Callable[[], None]] = None) -> StepValues:
        import paddle

        from paddle_impl.engine.optimizer import clip_grad_norm_

        self.optimizer.clear_grad()
        loss = paddle_projected_loss(named(self.model(paddle.to_tensor(batch))), self.seed)
        loss.backward()
        if after_backward is not None:
            after_backward()
        norm = clip_grad_norm_(self.optimizer.parameters().values(), self.clip if self.clip else math.inf)
        self.optimizer.step()
        return StepValues({"loss": float(loss)}, float(norm), self.lr)

    def gradients(self) -> dict[str, np.ndarray]:
        return {name: p.grad.numpy() for name, p in self.model.named_parameters()
                if not p.stop_gradient and p.grad is not None}

    def parameters(self) -> dict[str, np.ndarray]:
        """The trainable parameters (Paddle also lists BatchNorm statistics as parameters; torch
        keeps them as buffers, which the forward stage compares)."""
        return {name: p.numpy() for name, p in self.model.named_parameters() if not p.stop_gradient}

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        return {"momentum": {name: b.numpy() for name, b in self.optimizer.momentum_buffers().items()}}


@contextlib.contextmanager
def torch_side(pair: ModelPair, settings: dict, cache_dir: Optional[Path], fresh: bool) -> Iterator[tuple[Any, str]]:
    """The torch side of the run and how it was obtained, inside a ``with`` block: with
    ``cache_dir``, replayed from the cache when an entry matches the pair's reference key and
    ``settings`` (the run's steps, lr, optimizer, precision and seed), else recorded there as it
    trains (an entry only when the block ends without an exception); without, trained live."""
    import torch

    live = TorchTraining(pair.torch_model(), pair.name_map, **{k: settings[k] for k in
                         ("lr", "momentum", "weight_decay", "clip", "seed")})
    reference = pair.reference_key() if cache_dir is not None else None
    if reference is None:
        yield live, "off" if cache_dir is None else "not cacheable"
        return
    cache = ReferenceCache(cache_dir)
    key = cache_key({"stage": "backward", "format": 1, **reference, **settings,
                     "torch_threads": torch.get_num_threads()})
    arrays = None if fresh else cache.load(pair.stage, key)
    if arrays is not None:
        yield ReplaySide(live.name, arrays), "hit"
        return
    status = "fresh" if fresh else cache.last_status
    with cache.writer(pair.stage, key) as entry:
        yield RecordingSide(live, entry), status


def train_pair(pair: ModelPair, *, steps: int, lr: float, momentum: float, weight_decay: float,
               clip: Optional[float], dtype: str, seed: int, reports, title: str = "",
               cache_dir: Optional[Path] = None, fresh: bool = False) -> StageResult:
    """Train ``pair`` for ``steps`` steps on both sides in lockstep (see the module docstring) and
    write ``<stage>.json`` / ``.html`` (and reprod_log's files) into ``reports``; with
    ``cache_dir`` the torch side is kept there and replayed when nothing it depends on changed."""
    if dtype == "float64":
        pair.torch_model().double()
        pair.paddle_model.to(dtype="float64")
    shape = pair.inputs.shape
    batches = [np.random.default_rng(seed + 1000 * (k + 1)).standard_normal(shape).astype(dtype)
               for k in range(steps)]
    settings = {"steps": steps, "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "clip": clip,
                "dtype": dtype, "seed": seed, "shape": list(shape)}
    test = PaddleTraining(pair.paddle_model, lr=lr, momentum=momentum, weight_decay=weight_decay, clip=clip,
                          seed=seed)
    with torch_side(pair, settings, cache_dir, fresh) as (reference, cache_status):
        run = _lockstep(reference, test, batches, dtype)
    return _report(pair, run, settings, cache_status, reports, title)


def _lockstep(reference, test: PaddleTraining, batches: list, dtype: str):
    """Both sides through ``batches``: every step's values, step 1's gradients, the final state."""
    steps = len(batches)
    first_tol, later_tol, state_tol = TOLERANCES[dtype]

    def tolerance(step: int, name: str) -> tuple[float, float]:
        tol = 1e-12 if name == "lr" else first_tol if step == 1 else later_tol
        return tol, math.inf

    def at_gradients(step: int):
        return (compare_named("step1.grad", reference.gradients(), test.gradients(), first_tol, mean_tol=math.inf)
                if step == 1 else [])

    def after_step(record):
        if record.step != steps:
            return []
        # Relative bounds only: the parameters' scale is the model's, not the comparison's.
        return (compare_named("final.param", reference.parameters(), test.parameters(), state_tol, mean_tol=math.inf)
                + compare_named("final.momentum", reference.state()["momentum"], test.state()["momentum"], state_tol,
                                mean_tol=math.inf))

    return train_in_lockstep(reference, test, [(b, b) for b in batches], label=lambda step: f"step{step}",
                             tolerance=tolerance, at_gradients=at_gradients, after_step=after_step)


def _report(pair: ModelPair, run, settings: dict, cache_status: str, reports, title: str) -> StageResult:
    from align.engine.reprod import reprod_log_diff

    first_tol, later_tol, state_tol = TOLERANCES[settings["dtype"]]
    names = ["loss", "grad_norm"]
    ours, theirs = value_series(run, "test", names), value_series(run, "reference", names)
    reprod = reprod_log_diff({k: np.asarray(v) for k, v in ours.items()},
                             {k: np.asarray(v) for k, v in theirs.items()}, reports, pair.stage, later_tol)
    result = StageResult(
        stage=pair.stage,
        title=title or f"Training in lockstep: {pair.title}",
        passed=all(r.passed for r in run.rows),
        tensors=run.rows,
        thresholds={"step 1": first_tol, "later steps": later_tol, "final state": state_tol},
        meta={**pair.meta, **settings, "input_shape": settings["shape"],
              "loss": "sum(output * R), R seeded, over the first output",
              # "hit": the torch side was replayed from build/cache (its time is then 0); "off": no cache.
              "reference_cache": cache_status},
        figures=[("Loss per step, torch and Paddle, and their relative difference",
                  loss_curves_png(theirs["loss"], ours["loss"], later_tol, label=settings["dtype"],
                                  names=("torch", "paddle"), step="step"))],
        reprod_log=reprod,
        reprod_log_check=later_tol,
        headline=Headline.worst(run.rows, None, "worst compared value, max|diff| / max|ref|"),
        seconds=dict(run.seconds),
    )
    return pair.write_report(result, reports)


def first_divergence(result: StageResult) -> Optional[str]:
    return first_failed_name(result.tensors)
