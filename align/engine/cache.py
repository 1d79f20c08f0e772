"""The reference side's results kept between runs, so iterating on the test side skips it.

An entry is a set of named arrays saved under a key: the SHA-256 of
everything the reference's result depends on (checkpoint digest, input,
stage options, installed reference versions), given by the caller. It is a
folder ``<name>-<key>/`` holding one ``.npy`` file per array and a
``manifest.json`` with the key and, per array, its file, shape, dtype and
the SHA-256 of its bytes. The manifest is written last, so an interrupted
save leaves no usable entry.

One entry is kept per name: writing an entry removes the entries of the same
name under other keys first (a reference recorded before a change of the
options or of the reference code, which would otherwise stay on disk for good;
a training run's recording takes gigabytes).

An entry can also be written as it is produced (`ReferenceCache.writer`):
each array goes to its file at once, so a reference whose recording is larger
than memory (every step of a training run) never has to be held whole.

A load checks the key and every array's digest before it returns anything:
a file that does not match (truncated, edited, from another key) is not
trusted and the caller recomputes. The arrays come back memory-mapped,
read-only: a forward pass at detection sizes records gigabytes, and mapping
them costs neither a copy nor the memory of one. The digests are checked
on two threads (hashlib releases the GIL), which is what a hit costs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from common.atomic_write import write_error, write_json

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
        """The arrays saved under ``key`` (read-only memory maps), or None: absent (a miss) or
        not checking out (a mismatch: one line on stderr says why, and the caller recomputes)."""
        folder = self.entry(name, key)
        if not (folder / "manifest.json").is_file():
            self.last_status = "miss"
            return None
        try:
            arrays = _checked_arrays(folder, key)
        except _Stale as why:
            print(f"cache: {folder}: {why}; recomputing", file=sys.stderr)
            self.last_status = "mismatch"
            return None
        self.last_status = "hit"
        return arrays

    def save(self, name: str, key: str, arrays: Mapping[str, np.ndarray]) -> Path:
        """Save ``arrays`` under ``key`` (replacing an entry of the same key); returns its folder."""
        with self.writer(name, key) as entry:
            for array_name, array in arrays.items():
                entry.add(array_name, array)
        return entry.folder

    @contextlib.contextmanager
    def writer(self, name: str, key: str) -> Iterator["EntryWriter"]:
        """An `EntryWriter` for the entry ``name`` under ``key``; the entries of ``name`` under
        any key are removed first. Leaving the block normally writes the manifest; an exception
        removes the entry."""
        folder = self.entry(name, key)
        for stale in self.folder.glob(f"{name}-*"):
            suffix = stale.name[len(name) + 1:]
            if stale != folder and stale.is_dir() and len(suffix) == 20 and set(suffix) <= set("0123456789abcdef"):
                shutil.rmtree(stale)
        entry = EntryWriter(folder, key)
        try:
            yield entry
        except BaseException:
            shutil.rmtree(entry.folder, ignore_errors=True)
            raise
        entry.commit()


class _Stale(Exception):
    """An entry that does not check out; the message says why."""


def _checked_manifest(folder: Path, key: str) -> list[dict]:
    """The manifest's array records, each with a plain file name in ``folder``, a unique name,
    a shape, a dtype and a digest; `_Stale` naming the first thing that does not check out."""
    try:
        record = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        raise _Stale(f"manifest.json cannot be read ({' '.join(str(err).split())})") from None
    if not isinstance(record, dict):
        raise _Stale(f"manifest.json holds a {type(record).__name__}, not an object")
    if record.get("format") != FORMAT:
        raise _Stale(f"format {record.get('format')!r}, this program writes {FORMAT}")
    if record.get("key") != key:
        raise _Stale("recorded under another key")
    items = record.get("arrays")
    if not isinstance(items, list):
        raise _Stale("manifest.json has no list of arrays")
    names = set()
    for index, item in enumerate(items):
        fields = {"name": str, "file": str, "shape": list, "dtype": str, "sha256": str}
        if not isinstance(item, dict) or any(not isinstance(item.get(f), t) for f, t in fields.items()):
            raise _Stale(f"manifest.json: array {index} lacks one of {sorted(fields)} or has it of another type")
        if Path(item["file"]).name != item["file"] or not item["file"].endswith(".npy"):
            raise _Stale(f"manifest.json: array {item['name']!r} names the file {item['file']!r}, "
                         "not a .npy file of the entry")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in item["shape"]):
            raise _Stale(f"manifest.json: array {item['name']!r} has the shape {item['shape']!r}")
        if item["name"] in names:
            raise _Stale(f"manifest.json: array {item['name']!r} is listed twice")
        names.add(item["name"])
    return items


def _checked_arrays(folder: Path, key: str) -> dict[str, np.ndarray]:
    """Every array of the entry, memory-mapped, after its shape, dtype and digest checked out."""
    items = _checked_manifest(folder, key)
    arrays = {}
    for item in items:
        try:
            array = np.load(folder / item["file"], mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise _Stale(f"{item['file']} cannot be read ({' '.join(str(err).split())})") from None
        if list(array.shape) != item["shape"] or array.dtype.str != item["dtype"]:
            raise _Stale(f"{item['file']} holds {array.dtype.str} {list(array.shape)}, "
                         f"the manifest says {item['dtype']} {item['shape']}")
        arrays[item["name"]] = array
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        digests = list(pool.map(_digest, arrays.values()))
    for item, digest in zip(items, digests):
        if digest != item["sha256"]:
            raise _Stale(f"{item['file']} does not match its digest")
    return arrays


class EntryWriter:
    """Writes an entry's arrays one by one (`add`), then its manifest (`commit`).

    The array files are plain writes: until the manifest exists the folder is
    no entry, and once it does every file is checked against its digest on
    load, so neither a rename nor an fsync per file is needed for safety.
    """

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = Path(folder), key
        try:
            if self.folder.exists():
                shutil.rmtree(self.folder)
            self.folder.mkdir(parents=True)
        except OSError as err:
            raise write_error(self.folder, err) from err
        self.items: list[dict] = []
        self._names: set[str] = set()
        self.nbytes = 0

    def add(self, name: str, array) -> None:
        """Write one array (its current values: later changes to it are not seen)."""
        if name in self._names:
            raise ValueError(f"cache entry {self.folder.name}: array {name!r} added twice")
        array = np.asarray(array, order="C")
        file = f"{len(self.items):05d}.npy"
        try:
            np.save(self.folder / file, array, allow_pickle=False)
        except OSError as err:  # a full disk, most likely: a recording takes gigabytes
            raise write_error(self.folder / file, err) from err
        self._names.add(name)
        self.items.append({"name": name, "file": file, "shape": list(array.shape), "dtype": array.dtype.str,
                           "sha256": _digest(array)})
        self.nbytes += array.nbytes

    def commit(self) -> None:
        """Write the manifest: from now on the entry can be loaded."""
        write_json(self.folder / "manifest.json", {"format": FORMAT, "key": self.key, "arrays": self.items})
