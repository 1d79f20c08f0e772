"""The reference side's results kept between runs, so iterating on the Paddle side skips it.

An entry is a set of named arrays saved under a key: the SHA-256 of
everything the reference's result depends on (checkpoint digest, input,
stage options, installed reference versions), given by the caller. Beside
each ``<name>-<key>.npz`` a ``.json`` records the key and the digest of the
``.npz`` itself. A load checks both: a file that does not match its recorded
digest (truncated, edited, from another key) is not trusted and the caller
recomputes. Writes go through the atomic writer, so an interrupted save
leaves no entry rather than half of one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from .atomic_write import atomic_write, write_json
from .environment import sha256_of


def cache_key(parts: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``parts`` as canonical JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class ReferenceCache:
    """Named arrays on disk under ``folder``, keyed and checked as the module docstring says."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.last_status = ""  # "hit", "miss", "mismatch" or "" (nothing asked yet)

    def _paths(self, name: str, key: str) -> tuple[Path, Path]:
        stem = f"{name}-{key[:20]}"
        return self.folder / f"{stem}.npz", self.folder / f"{stem}.json"

    def load(self, name: str, key: str) -> Optional[dict[str, np.ndarray]]:
        """The arrays saved under ``key``, or None (absent, or not matching its digest)."""
        data, meta = self._paths(name, key)
        if not (data.is_file() and meta.is_file()):
            self.last_status = "miss"
            return None
        try:
            record = json.loads(meta.read_text())
            if record.get("key") != key or record.get("sha256") != sha256_of(data):
                self.last_status = "mismatch"
                return None
            with np.load(data, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except (OSError, ValueError):
            self.last_status = "mismatch"
            return None
        self.last_status = "hit"
        return arrays

    def save(self, name: str, key: str, arrays: Mapping[str, np.ndarray]) -> Path:
        """Save ``arrays`` under ``key`` (replacing an entry of the same key)."""
        data, meta = self._paths(name, key)
        atomic_write(data, lambda tmp: np.savez(tmp, **arrays), keep_suffix=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(meta, {"key": key, "sha256": sha256_of(data), "arrays": len(arrays)})
        return data
