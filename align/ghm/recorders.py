"""What mmdet's and our GHM losses did in each call: the bin counts of their inputs and ``acc_sum`` after.

The loss stage compares them call by call; the train stage lists the calls
whose bin counts differ between the frameworks (where a rounding-level
agreement of the losses breaks).
"""
from __future__ import annotations

import time

import numpy as np


def reference_bin_counts(g, valid, edges) -> np.ndarray:
    """Bin counts by the GHM definition: ``edges[i] <= g < edges[i+1]`` and valid (torch tensors).

    ``bucketize(right=True)`` gives ``i + 1`` for ``edges[i] <= g < edges[i+1]``; g
    below the first edge, at or above the last, or NaN lands outside ``0..bins-1``.
    """
    import torch

    bins = len(edges) - 1
    ids = torch.bucketize(g, edges.to(g.dtype), right=True) - 1
    keep = valid & (ids >= 0) & (ids < bins)
    return torch.bincount(ids[keep], minlength=bins).numpy().astype(np.int64)


class TorchGHMRecorder:
    """Per call of mmdet's GHMC / GHMR: bin counts of its inputs and ``acc_sum`` after.

    With ``keep_g``, ``g`` maps a call's index to its ``(g, valid)`` arrays (same
    shape) until `clear_g`: what decides each element's bin.
    """

    def __init__(self, module, kind: str, keep_g: bool = False):
        self.module, self.kind, self.keep_g = module, kind, keep_g
        self.counts: list[np.ndarray] = []
        self.acc_sums: list[np.ndarray] = []
        self.g: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.seconds = 0.0
        self.overhead = 0.0
        self._handles = []

    def _pre(self, module, args):
        self._t0 = time.perf_counter()

    def _post(self, module, args, output):
        import torch

        start = time.perf_counter()
        self.seconds += start - self._t0
        pred, target, label_weight = args[:3]
        with torch.no_grad():
            if self.kind == "cls":
                if pred.dim() != target.dim():
                    num_classes = pred.size(-1)
                    in_range = (target >= 0) & (target < num_classes)
                    onehot = torch.zeros_like(pred)
                    rows = torch.nonzero(in_range, as_tuple=True)[0]
                    onehot[rows, target[rows]] = 1
                    target = onehot
                    label_weight = label_weight.view(-1, 1).expand_as(pred)
                g = (pred.sigmoid() - target).abs()
            else:
                diff = pred - target
                g = (diff / torch.sqrt(module.mu * module.mu + diff * diff)).abs()
            valid = (label_weight > 0).expand_as(g)
            if self.keep_g:
                self.g[len(self.counts)] = (g.numpy().copy(), valid.numpy().copy())
            self.counts.append(reference_bin_counts(g, valid, module.edges))
        self.acc_sums.append(module.acc_sum.detach().numpy().copy())
        self.overhead += time.perf_counter() - start

    def edges(self) -> np.ndarray:
        return self.module.edges.detach().numpy()

    def clear_g(self) -> None:
        self.g.clear()

    def __enter__(self):
        self._handles = [self.module.register_forward_pre_hook(self._pre),
                         self.module.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


class PaddleGHMRecorder:
    """Per call of our GHMC / GHMR: its bin counts and ``acc_sum`` after; with ``keep_g``
    also ``(g, valid)`` per call until `clear_g`, as the layer bins them."""

    def __init__(self, layer, keep_g: bool = False):
        self.layer, self.keep_g = layer, keep_g
        self.counts: list[np.ndarray] = []
        self.acc_sums: list[np.ndarray] = []
        self.g: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._handle = None

    def _post(self, layer, inputs, output):
        self.counts.append(layer.last_bin_counts.numpy().astype(np.int64))
        self.acc_sums.append(layer.acc_sum.numpy().copy())

    def _binning(self, g, valid):
        # The layer's own binning step, seen with the exact g it bins.
        if self.keep_g:
            values, mask = g.numpy(), valid.numpy()
            if values.size == int(np.prod(self._shape)) and values.shape != self._shape:
                # GHM-R bins a flat view of its (N, 4) elements: kept in the shape of the
                # prediction, which is the shape of mmdet's g.
                values = values.reshape(self._shape)
                mask = mask.reshape(self._shape) if mask.size == values.size else mask
            self.g[len(self.counts)] = (values.copy(), np.broadcast_to(mask, values.shape).copy())
        return self._region_ids(g, valid)

    def clear_g(self) -> None:
        self.g.clear()

    def _pre(self, layer, inputs):
        self._shape = tuple(inputs[0].shape)

    def __enter__(self):
        self._handle = self.layer.register_forward_post_hook(self._post)
        self._pre_handle = self.layer.register_forward_pre_hook(self._pre)
        self._shape = ()
        self._region_ids = self.layer._region_ids
        self.layer._region_ids = self._binning
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        self._pre_handle.remove()
        del self.layer._region_ids


def recorded_calls(recorder: TorchGHMRecorder, first: int) -> dict[str, np.ndarray]:
    """Calls ``first``, ``first + 1``, ... of ``recorder`` as named arrays, for a recording of
    the reference: ``edges`` and per call ``<index>/counts``, ``<index>/acc_sum`` and, where
    kept, ``<index>/g`` and ``<index>/valid``. `RecordedGHM` reads them back."""
    out = {"edges": recorder.edges()}
    for call in range(first, len(recorder.counts)):
        out[f"{call:05d}/counts"] = recorder.counts[call]
        out[f"{call:05d}/acc_sum"] = recorder.acc_sums[call]
        if call in recorder.g:
            out[f"{call:05d}/g"], out[f"{call:05d}/valid"] = recorder.g[call]
    return out


class RecordedGHM:
    """A `TorchGHMRecorder` read back from `recorded_calls` (what `BinFlips` and the stages
    read of it: ``counts``, ``acc_sums``, ``g``, ``edges()``, ``clear_g()``)."""

    def __init__(self):
        self.counts: list[np.ndarray] = []
        self.acc_sums: list[np.ndarray] = []
        self.g: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._edges = np.zeros(0)

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        """Append the calls in ``arrays`` (one `recorded_calls` result), in call order."""
        if "edges" in arrays:
            self._edges = np.asarray(arrays["edges"])
        calls = sorted({int(name.partition("/")[0]) for name in arrays if name != "edges"})
        for call in calls:
            if call != len(self.counts):
                raise ValueError(f"recorded GHM call {call} follows call {len(self.counts) - 1}")
            self.counts.append(np.asarray(arrays[f"{call:05d}/counts"]))
            self.acc_sums.append(np.asarray(arrays[f"{call:05d}/acc_sum"]))
            if f"{call:05d}/g" in arrays:
                self.g[call] = (np.asarray(arrays[f"{call:05d}/g"]), np.asarray(arrays[f"{call:05d}/valid"]))

    def edges(self) -> np.ndarray:
        return self._edges

    def clear_g(self) -> None:
        self.g.clear()


def ghm_records(prefix: str, recorder) -> dict[str, np.ndarray]:
    out = {}
    for j, (c, a) in enumerate(zip(recorder.counts, recorder.acc_sums)):
        out[f"{prefix}.call{j:02d}.bin_counts"] = c
        out[f"{prefix}.call{j:02d}.acc_sum"] = a
    return out
