"""The reference side's results kept between runs, so iterating on the test side skips it.

An entry is a set of named arrays saved under a key: the SHA-256 of
everything the reference's result depends on (checkpoint digest, input,
stage options, installed reference versions), given by the caller. It is a
folder ``<name>-<key>/`` holding one ``.npy`` file per array and a
``manifest.json`` with the key and, per array, its file, shape, dtype and
the SHA-256 of its bytes. The manifest is written last, so an interrupted
save leaves no usable entry.

A load checks the key and every array's digest before it returns anything:
a file that does not match (truncated, edited, from another key) is not
trusted and the caller recomputes. The arrays come back memory-mapped,
read-only: a forward pass at detection sizes records gigabytes, and mapping
them costs neither a copy nor the memory of one. The digests are checked
on two threads (hashlib releases the GIL), which is what a hit costs.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from .atomic_write import atomic_write, write_json

FORMAT = 2
_HASH_THREADS = 2


def cache_key(parts: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``parts`` as canonical JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _digest(array: np.ndarray) -> str:
    """SHA-256 of an array's bytes in C order."""
    return hashlib.sha256(memoryview(np.asarray(array, order="C")).cast("B")).hexdigest()


class ReferenceCache:
    """Named arrays on disk under ``folder``, keyed and checked as the module docstring says."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.last_status = ""  # "hit", "miss", "mismatch" or "" (nothing asked yet)

    def entry(self, name: str, key: str) -> Path:
        """The folder of the entry ``name`` under ``key``."""
        return self.folder / f"{name}-{key[:20]}"

    def load(self, name: str, key: str) -> Optional[dict[str, np.ndarray]]:
        """The arrays saved under ``key`` (read-only memory maps), or None (absent, or a file
        not matching its digest)."""
        folder = self.entry(name, key)
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            self.last_status = "miss"
            return None
        try:
            record = json.loads(manifest.read_text())
            if record.get("format") != FORMAT or record.get("key") != key:
                raise ValueError("another key or format")
            arrays = {}
            for item in record["arrays"]:
                array = np.load(folder / item["file"], mmap_mode="r", allow_pickle=False)
                if list(array.shape) != item["shape"] or array.dtype.str != item["dtype"]:
                    raise ValueError(f"{item['file']}: shape or dtype differs from the manifest")
                arrays[item["name"]] = array
            with ThreadPoolExecutor(_HASH_THREADS) as pool:
                digests = list(pool.map(_digest, arrays.values()))
            if digests != [item["sha256"] for item in record["arrays"]]:
                raise ValueError("an array does not match its digest")
        except (OSError, ValueError, KeyError, TypeError):
            self.last_status = "mismatch"
            return None
        self.last_status = "hit"
        return arrays

    def save(self, name: str, key: str, arrays: Mapping[str, np.ndarray]) -> Path:
        """Save ``arrays`` under ``key`` (replacing an entry of the same key); returns its folder."""
        folder = self.entry(name, key)
        if folder.exists():
            shutil.rmtree(folder)
        items = []
        for index, (array_name, array) in enumerate(arrays.items()):
            array = np.asarray(array, order="C")
            file = f"{index:05d}.npy"
            atomic_write(folder / file, lambda tmp, a=array: np.save(tmp, a, allow_pickle=False),
                         keep_suffix=True)
            items.append({"name": array_name, "file": file, "shape": list(array.shape),
                          "dtype": array.dtype.str, "sha256": _digest(array)})
        write_json(folder / "manifest.json", {"format": FORMAT, "key": key, "arrays": items})
        return folder
