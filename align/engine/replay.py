"""A side's training steps recorded once, then replayed without its framework.

`RecordingSide` wraps a `~align.engine.paired.Side` and writes, as each step
happens, everything `train_in_lockstep` and its callers read from a side: the
gradients (when the side calls ``after_backward``), then, after the update,
the parameters, every state group and the step's values (loss terms,
gradient norm, learning rate). A client may add arrays of its own per step
(``extras``: what its hooks saw in the forward pass, for example). The arrays
go to a sink with ``add(name, array)``, such as a
`~align.engine.cache.EntryWriter`, so a recording larger than memory never
has to be held whole.

`ReplaySide` is a `Side` made of such a recording: its ``train_step`` calls
``after_backward`` with the recorded gradients in place and returns the
recorded values, so the test side can be run and compared against the
reference without computing it again. Its tensors are numpy arrays (the
engine's comparisons take them as they take torch or Paddle tensors).

Array names: ``step0001/grad/<parameter>``, ``step0001/param/<parameter>``,
``step0001/state/<group>/<name>``, ``step0001/loss/<term>``,
``step0001/grad_norm``, ``step0001/lr`` and ``step0001/extra/<name>``; names
outside ``stepNNNN/`` belong to the client.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import numpy as np

from .compare import to_numpy
from .paired import Side, StepValues


def step_prefix(step: int) -> str:
    """The name prefix of step ``step`` (1-based)."""
    return f"step{step:04d}/"


class RecordingSide:
    """``side``, with every step written to ``sink`` (see the module docstring).

    Args:
        side: the side that computes.
        sink: anything with ``add(name, array)``; it must keep the values it is
            given at once (the tensors change in the next step).
        extras: called with the gradients in place (after the side's backward,
            before the caller's ``after_backward``); the arrays it returns are
            recorded as the step's ``extra/<name>``.

    Other attributes are the wrapped side's (``model``, ``max_norm``, ...).
    """

    def __init__(self, side: Side, sink, extras: Optional[Callable[[], Mapping[str, Any]]] = None):
        self.side, self.sink, self.extras = side, sink, extras
        self.name = side.name
        self.steps = 0

    def __getattr__(self, attribute: str):
        return getattr(self.side, attribute)

    def _add(self, prefix: str, tensors: Mapping[str, Any]) -> None:
        for name, tensor in tensors.items():
            self.sink.add(prefix + name, to_numpy(tensor, keep=False))

    def train_step(self, batch: Any, after_backward: Optional[Callable[[], None]] = None) -> StepValues:
        prefix = step_prefix(self.steps + 1)

        def record_gradients() -> None:
            self._add(prefix + "grad/", self.side.gradients())
            if self.extras is not None:
                self._add(prefix + "extra/", self.extras())
            if after_backward is not None:
                after_backward()

        values = self.side.train_step(batch, after_backward=record_gradients)
        self.steps += 1
        self._add(prefix + "param/", self.side.parameters())
        for group, tensors in self.side.state().items():
            self._add(f"{prefix}state/{group}/", tensors)
        for term, value in values.losses.items():
            self.sink.add(f"{prefix}loss/{term}", np.float64(value))
        self.sink.add(prefix + "grad_norm", np.float64(values.grad_norm))
        self.sink.add(prefix + "lr", np.float64(values.lr))
        return values

    def gradients(self) -> Mapping[str, Any]:
        return self.side.gradients()

    def parameters(self) -> Mapping[str, Any]:
        return self.side.parameters()

    def state(self) -> Mapping[str, Mapping[str, Any]]:
        return self.side.state()


class ReplaySide:
    """A `Side` replaying a `RecordingSide`'s arrays (``name``: the recorded side's name).

    ``train_step`` ignores its batch: the caller makes sure the recording was
    made from the same batches (the key of a cache entry covers them).
    During a step's ``after_backward`` the parameters and state are those
    before the update, as on a live side; before the first step there are
    none (the recording starts with step 1's gradients).
    """

    def __init__(self, name: str, arrays: Mapping[str, np.ndarray]):
        self.name = name
        self._groups: dict[tuple[int, str], dict[str, np.ndarray]] = {}
        for key, array in arrays.items():
            head, slash, rest = key.partition("/")
            if not (slash and head.startswith("step") and head[4:].isdigit()):
                continue
            kind, _, sub = rest.partition("/")
            self._groups.setdefault((int(head[4:]), kind), {})[sub] = array
        self.steps = max((step for step, _ in self._groups), default=0)
        self.step = 0  # the step being replayed (or last replayed)
        self._updated = 0  # the last step whose update is in effect

    def _group(self, step: int, kind: str) -> dict[str, np.ndarray]:
        return self._groups.get((step, kind), {})

    def train_step(self, batch: Any, after_backward: Optional[Callable[[], None]] = None) -> StepValues:
        if self.step >= self.steps:
            raise ValueError(f"the recording of {self.name!r} has {self.steps} steps; step {self.step + 1} "
                             "was asked for")
        self.step += 1
        if after_backward is not None:
            after_backward()
        self._updated = self.step
        return StepValues(losses={term: np.float64(v[()]) for term, v in self._group(self.step, "loss").items()},
                          grad_norm=self._scalar("grad_norm"), lr=self._scalar("lr"))

    def _scalar(self, name: str) -> float:
        return float(self._group(self.step, name)[""])

    def gradients(self) -> dict[str, np.ndarray]:
        return self._group(self.step, "grad")

    def parameters(self) -> dict[str, np.ndarray]:
        if self._updated == 0:
            raise ValueError(f"the recording of {self.name!r} holds no parameters before step 1")
        return self._group(self._updated, "param")

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        if self._updated == 0:
            raise ValueError(f"the recording of {self.name!r} holds no state before step 1")
        groups: dict[str, dict[str, np.ndarray]] = {}
        for name, array in self._group(self._updated, "state").items():
            group, _, tensor = name.partition("/")
            groups.setdefault(group, {})[tensor] = array
        return groups

    def extras(self, step: int) -> dict[str, np.ndarray]:
        """The client's arrays of step ``step``."""
        return self._group(step, "extra")
