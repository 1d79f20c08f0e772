"""Any pair trained in lockstep: the backward stage's `TrainingPair` of two models that functions build.

Both models start from the same weights (carried by the map file's conversions, as the
forward stage carries them), take the same inputs at every step (a new seeded draw each
step: one standard-normal array of ``--shape``, or the named arrays of the ``--input``
specs; the arrays of an ``--inputs`` file at every step), called as the forward stage calls
them (keyword arguments, or positionally), and minimise the same loss: ``sum(output * R)``
over the first output (``R`` seeded, `align.forward.stage.projection`), or the user's
(``--loss module:factory``: ``factory("torch")`` and ``factory("paddle")`` each return
``loss(output, inputs)`` giving a scalar tensor). Each side steps with its framework's own
optimizer and clipping (`align.pair.optimizers`); the stage compares every step's loss,
gradient norm before clipping and learning rate, every gradient at step 1 and every
parameter and optimizer state tensor (momentum, Adam's moments) after the last step, under
Paddle's names and in Paddle's layout: torch's values go through the same conversions as
the weights (`align.engine.weights.convert_arrays`: Linear weights transposed, a packed
``in_proj_weight`` and its moments split into ``q_proj``, ``k_proj``, ``v_proj``, a recurrent
layer's gate blocks reordered, the map's tensor rules and converters); these only rearrange
elements, which is all the element-wise optimizer states allow. Integer and boolean inputs
(token ids, masks) take no gradient. Paddle's recurrent layers without dropout train in
training mode (`align.forward.stage.recurrent_layers_differentiable`).

Bounds are relative (the pair's scale is unknown): 1e-9 for everything in float64, where
two correct implementations agree to about 1e-12 and a missing weight decay moves a
parameter by about 1e-6, but 1e-8 for the state after the last step with Adam and AdamW
(`ADAPTIVE_STATE_FLOAT64`); in float32 1e-5 at step 1 and 1e-4 after it. A row over its
bound passes when its difference is within the bound of its layer's largest value of the
same kind (`Bounds.layer_scaled`: a tensor that is zero in exact arithmetic holds rounding
noise). The informational run's disagreements are listed with their ReLU-flip causes where
the census finds them; they do not decide the verdict.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from align.backward.lockstep import Bounds, Diagnostics, Extras, RunSides
from align.engine.cache import ReferenceCache, cache_key
from align.engine.environment import source_digest
from align.engine.paired import StepValues
from align.engine.replay import RecordingSide, ReplaySide
from align.engine.weights import Conversion, NameMap, convert_arrays, is_linear_weight
from align.forward.stage import (describe_inputs, paddle_projected_loss, recurrent_layers_differentiable,
                                 torch_projected_loss)
from align.pair.inputs import floats_as, npz_inputs, seeded_inputs
from align.pair.optimizers import (STATE_LABELS, OptimizerSettings, PaddleClip, global_norm, paddle_optimizer,
                                   paddle_state, torch_optimizer)
from align.pair.run import ModelPair, load_builder, named

# Relative bounds by precision: (step 1, later steps, final state).
TOLERANCES = {"float32": (1e-5, 1e-4, 1e-4), "float64": (1e-9, 1e-9, 1e-9)}
# Adam divides each gradient element by its own magnitude, so an element far below its tensor's
# largest carries its rounding (1e-12 of the largest) into a step of its own size: the
# parameters part by more than the gradients (2.6e-9 on the ResNet-18 example over 3 steps).
ADAPTIVE_STATE_FLOAT64 = 1e-8
DEFAULT_LOSS = "sum(output * R), R seeded, over the first output"


def loss_functions(spec: Optional[str], seed: int) -> tuple[Callable, Callable, str]:
    """``(torch loss, Paddle loss, description)``, each ``loss(output, inputs) -> scalar``; a
    factory that cannot be imported or does not return callables is a ``ValueError`` naming ``--loss``."""
    if spec is None:
        return (lambda output, inputs: torch_projected_loss(named(output), seed),
                lambda output, inputs: paddle_projected_loss(named(output), seed), DEFAULT_LOSS)
    factory = load_builder(spec, "--loss")
    made = []
    for framework in ("torch", "paddle"):
        try:
            loss = factory(framework)
        except Exception as err:
            raise ValueError(f"--loss {spec}: the factory raised {type(err).__name__}: {err}") from err
        if not callable(loss):
            raise ValueError(f"--loss {spec}: factory({framework!r}) returned {type(loss).__name__}, not a callable")
        made.append(loss)
    return made[0], made[1], spec


def forward(model, batch: Any, to_tensor: Callable[[np.ndarray], Any]) -> tuple[Any, Any]:
    """``(output, inputs)``: ``model`` on ``batch`` as the framework's tensors, called as the forward
    stage calls it: one array positionally, name -> array as keyword arguments, a tuple of arrays
    (``--positional``) positionally in order. The loss gets ``inputs`` in the same form."""
    if isinstance(batch, dict):
        inputs = {k: to_tensor(v) for k, v in batch.items()}
        return model(**inputs), inputs
    if isinstance(batch, tuple):
        inputs = tuple(to_tensor(v) for v in batch)
        return model(*inputs), inputs
    inputs = to_tensor(batch)
    return model(inputs), inputs


class TorchTraining:
    """The torch model as a `Side`: its optimizer, ``clip_grad_norm_``, values under Paddle's names.

    Args:
        conversions: the weights' conversions (`align.pair.run.ModelPair.conversions`), which
            name and lay out the gradients, parameters and optimizer state as Paddle's; empty:
            ``name_map.tensor`` renames them and Linear weights are transposed.
    """

    name = "torch"

    def __init__(self, model, name_map: NameMap, settings: OptimizerSettings, loss: Callable,
                 conversions: Sequence[Conversion] = ()):
        self.model, self.name_map, self.settings, self.loss = model, name_map, settings, loss
        self.conversions = list(conversions)
        self.optimizer = torch_optimizer(model.parameters(), settings)

    def train_step(self, batch: Any, after_backward: Optional[Callable[[], None]] = None) -> StepValues:
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        output, inputs = forward(self.model, batch, torch.from_numpy)
        loss = self.loss(output, inputs)
        loss.backward()
        if after_backward is not None:
            after_backward()
        trained = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(trained, self.settings.clip or math.inf)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        return StepValues({"loss": float(loss.detach())}, float(norm), float(lr))

    def _by_paddle_name(self, value: Callable[[Any], Any]) -> dict[str, np.ndarray]:
        """``value(parameter)`` of every trainable parameter, under Paddle's names in Paddle's layout."""
        arrays = {}
        for name, param in self.model.named_parameters():
            array = value(param) if param.requires_grad else None
            arrays[name] = None if array is None else array.detach().cpu().numpy()
        if self.conversions:
            return {k: v for k, v in convert_arrays(self.conversions, arrays).items() if v is not None}
        return {self.name_map.tensor(name): array.T if is_linear_weight(self.model, name) else array
                for name, array in arrays.items() if array is not None}

    def gradients(self) -> dict[str, np.ndarray]:
        return self._by_paddle_name(lambda p: p.grad)

    def parameters(self) -> dict[str, np.ndarray]:
        return self._by_paddle_name(lambda p: p)

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        return {group: self._by_paddle_name(lambda p, key=key: self.optimizer.state.get(p, {}).get(key))
                for group, (key, _) in self.settings.state_groups().items()}


class PaddleTraining:
    """The Paddle model as a `Side`: its optimizer and ``ClipGradByGlobalNorm`` (`PaddleClip`)."""

    name = "paddle"

    def __init__(self, model, settings: OptimizerSettings, loss: Callable):
        self.model, self.settings, self.loss = model, settings, loss
        self.trained = {n: p for n, p in model.named_parameters() if not p.stop_gradient}
        self.clip = PaddleClip(settings.clip) if settings.clip else None
        self.optimizer = paddle_optimizer(list(self.trained.values()), settings, self.clip)

    def train_step(self, batch: Any, after_backward: Optional[Callable[[], None]] = None) -> StepValues:
        import paddle

        self.optimizer.clear_grad(set_to_zero=False)
        with recurrent_layers_differentiable(self.model):
            output, inputs = forward(self.model, batch, paddle.to_tensor)
            loss = self.loss(output, inputs)
            loss.backward()
        if after_backward is not None:
            after_backward()
        norm = global_norm(p.grad for p in self.trained.values() if p.grad is not None)
        if self.clip is not None:
            self.clip.set_norm(norm)
        lr = self.optimizer.get_lr()
        self.optimizer.step()
        return StepValues({"loss": float(loss)}, norm, float(lr))

    def gradients(self) -> dict[str, np.ndarray]:
        return {name: p.grad.numpy() for name, p in self.trained.items() if p.grad is not None}

    def parameters(self) -> dict[str, np.ndarray]:
        """The trainable parameters (Paddle also lists BatchNorm statistics as parameters; torch
        keeps them as buffers, which the forward stage compares)."""
        return {name: p.numpy() for name, p in self.trained.items()}

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        return {group: {n: t.numpy() for n, t in tensors.items()}
                for group, tensors in paddle_state(self.optimizer, self.trained, self.settings).items()}


class BuilderTraining:
    """A `ModelPair` trained in lockstep (see the module docstring).

    Args:
        pair: the two models with equal weights (`align.pair.run.builder_pair`).
        settings: the optimizer both frameworks use.
        steps: training steps; dtypes: the checked precision, then an informational one.
        loss: ``--loss`` (None: the projected loss); seed: of ``R`` and of the batches.
        cache_dir: keep the torch side there and replay it when nothing it depends on changed.
        input_specs: the ``--input`` specs of ``pair.inputs``, drawn again for every step;
            inputs_file: the ``--inputs`` file of ``pair.inputs``, the same arrays at every step;
            neither: one standard-normal array of ``pair.inputs``' shape per step.
        paddle_builder: ``dtype -> Paddle model`` built with that default dtype, for a run in a
            dtype other than the pair's (Paddle's LSTM cannot be cast by ``Layer.to``); None:
            the pair's model cast.
    """

    reference = "torch"
    total = "loss"
    informational_decides = False

    def __init__(self, pair: ModelPair, settings: OptimizerSettings, *, steps: int, dtypes: list[str],
                 loss: Optional[str], seed: int, cache_dir=None, fresh: bool = False,
                 input_specs: Sequence[str] = (), inputs_file: Optional[Path] = None,
                 paddle_builder: Optional[Callable[[str], Any]] = None):
        import torch

        self.pair, self.settings, self.steps, self.dtypes, self.seed = pair, settings, steps, dtypes, seed
        self.torch_loss, self.paddle_loss, loss_text = loss_functions(loss, seed)
        self.loss_spec, self.cache_dir, self.fresh = loss, cache_dir, fresh
        self.input_specs, self.inputs_file, self.paddle_builder = tuple(input_specs), inputs_file, paddle_builder
        self.stage, self.write_report = pair.stage, pair.write_report
        self.title = f"Training in lockstep ({settings.kind}): {pair.title}"
        self.state_labels = {g: STATE_LABELS[g] for g in settings.state_groups()}
        # Every run starts from these weights (a run trains the models in place).
        self._torch_initial = {k: v.detach().clone() for k, v in pair.torch_model().state_dict().items()}
        self._paddle_initial = {k: v.numpy().copy() for k, v in pair.paddle_model.state_dict().items()}
        self.meta = {**pair.meta, "seed": seed, "input_shape": describe_inputs(pair.inputs),
                     "input_specs": list(self.input_specs) or None, "positional": pair.positional, "steps": steps,
                     "optimizer": settings.kind, "base_lr": settings.lr, "momentum": settings.momentum,
                     "betas": list(settings.betas), "eps": settings.eps, "weight_decay": settings.weight_decay,
                     "clip_max_norm": settings.clip, "loss": loss_text, "torch_threads": torch.get_num_threads()}

    def bounds(self, dtype: str) -> Bounds:
        first, later, state = TOLERANCES[dtype]
        if dtype == "float64" and self.settings.kind in ("adam", "adamw"):
            state = ADAPTIVE_STATE_FLOAT64
        return Bounds(grad=first, loss_first=first, loss=later, state=state, lr=1e-12, mean=False, layer_scaled=True)

    def batches(self, dtype: str) -> list[tuple[Any, Any]]:
        """Per step the same batch for both sides: one array, name -> array, or with ``--positional``
        those arrays as a tuple (floating ones in ``dtype``; see `forward`)."""
        out = []
        for k in range(self.steps):
            seed = self.seed + 1000 * (k + 1)
            if self.inputs_file is not None:
                batch = floats_as(npz_inputs(self.inputs_file), dtype)
            elif self.input_specs:
                batch = floats_as(seeded_inputs(self.input_specs, seed), dtype)
            elif isinstance(self.pair.inputs, dict):
                batch = floats_as(self.pair.inputs, dtype)
            else:
                batch = np.random.default_rng(seed).standard_normal(self.pair.inputs.shape).astype(dtype)
            if isinstance(batch, dict) and self.pair.positional:
                batch = tuple(batch.values())
            out.append((batch, batch))
        return out

    def diagnostics(self, dtype: str) -> Diagnostics:
        return Diagnostics(self.pair.name_map)

    def _models(self, dtype: str):
        """Both models in ``dtype`` holding the initial weights."""
        import paddle
        import torch

        torch_model = self.pair.torch_model()
        torch_model.to({"float64": torch.float64, "float32": torch.float32}[dtype])
        torch_model.load_state_dict(self._torch_initial)
        paddle_model = self.pair.paddle_model
        if _dtype_of(paddle_model) != dtype:
            if self.paddle_builder is not None:
                paddle_model = self.paddle_builder(dtype)
            else:
                paddle_model.to(dtype=dtype)
        paddle_model.set_state_dict({k: paddle.to_tensor(v.astype(dtype) if v.dtype.kind == "f" else v)
                                     for k, v in self._paddle_initial.items()})
        return torch_model, paddle_model

    @contextlib.contextmanager
    def sides(self, dtype: str, diagnostics: Diagnostics) -> Iterator[RunSides]:
        """The torch side live, recorded into the cache as it trains, or replayed from it."""
        import torch

        torch_model, paddle_model = self._models(dtype)
        live = TorchTraining(torch_model, self.pair.name_map, self.settings, self.torch_loss,
                             conversions=self.pair.conversions)
        test = PaddleTraining(paddle_model, self.settings, self.paddle_loss)
        clip = self.settings.clip
        reference = self.pair.reference_key() if self.cache_dir is not None else None
        if reference is None:
            yield RunSides(live, test, torch_model, paddle_model, clip,
                           "off" if self.cache_dir is None else "not cacheable")
            return
        cache = ReferenceCache(self.cache_dir)
        loss_code = source_digest(self.loss_spec.partition(":")[0]) if self.loss_spec else None
        key = cache_key({"stage": "backward", "format": 3, "input_specs": list(self.input_specs), **reference, "settings": repr(self.settings),
                         "loss": self.loss_spec, "loss_code": loss_code, "steps": self.steps, "dtype": dtype, "seed": self.seed,
                         "inputs": describe_inputs(self.pair.inputs), "torch_threads": torch.get_num_threads()})
        name = f"{self.stage}-{dtype}"
        arrays = None if self.fresh else cache.load(name, key)
        if arrays is not None:
            yield RunSides(ReplaySide(live.name, arrays), test, None, paddle_model, clip, "hit")
            return
        status = "fresh" if self.fresh else cache.last_status
        with cache.writer(name, key) as entry:
            yield RunSides(RecordingSide(live, entry, extras=diagnostics.reference_extras), test, torch_model,
                           paddle_model, clip, status)

    def finish(self, runs) -> Extras:
        return Extras()


def _dtype_of(paddle_model) -> Optional[str]:
    """The dtype of the model's first floating parameter ("float32", "float64"), None without one."""
    for param in paddle_model.parameters():
        name = str(param.dtype).replace("paddle.", "")
        if name.startswith("float"):
            return name
    return None
