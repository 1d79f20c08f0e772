"""The reference cache takes an entry only when everything in it checks out; anything else is a
mismatch, named in one line on stderr, and the caller recomputes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from align.engine.cache import ReferenceCache, cache_key

KEY = cache_key({"checkpoint": "abc", "shape": [1, 3, 8, 8]})


def _manifest(entry):
    return json.loads((entry / "manifest.json").read_text())


def _with_array_field(field, value):
    def plant(manifest):
        manifest["arrays"][0][field] = value
        return manifest
    return plant


def _without_array_field(field):
    def plant(manifest):
        del manifest["arrays"][0][field]
        return manifest
    return plant


def _duplicate_name(manifest):
    manifest["arrays"][1]["name"] = manifest["arrays"][0]["name"]
    return manifest


# What is planted in a good entry's manifest, and a word the stderr line must contain.
PLANTED = {
    "a list": (lambda m: [1, 2, 3], "list"),
    "null": (lambda m: None, "NoneType"),
    "a string": (lambda m: "entry", "str"),
    "no format": (lambda m: {k: v for k, v in m.items() if k != "format"}, "format"),
    "another format": (lambda m: {**m, "format": 1}, "format"),
    "another key": (lambda m: {**m, "key": "0" * 64}, "key"),
    "no arrays": (lambda m: {k: v for k, v in m.items() if k != "arrays"}, "arrays"),
    "arrays not a list": (lambda m: {**m, "arrays": {"name": "x"}}, "arrays"),
    "an array record not an object": (lambda m: {**m, "arrays": [3] + m["arrays"][1:]}, "array 0"),
    "no digest": (_without_array_field("sha256"), "array 0"),
    "no shape": (_without_array_field("shape"), "array 0"),
    "a shape of another type": (_with_array_field("shape", "2x3"), "array 0"),
    "a negative extent": (_with_array_field("shape", [-2, 3]), "shape"),
    "a file outside the entry": (_with_array_field("file", "../00000.npy"), "file"),
    "a file that is not .npy": (_with_array_field("file", "manifest.json"), "file"),
    "another dtype": (_with_array_field("dtype", "<f4"), "<f4"),
    "another shape": (_with_array_field("shape", [3, 2]), "[3, 2]"),
    "another digest": (_with_array_field("sha256", "0" * 64), "digest"),
    "a name twice": (_duplicate_name, "twice"),
}


@pytest.mark.parametrize("what", list(PLANTED))
def test_a_manifest_that_does_not_check_out_is_a_mismatch_named_on_stderr(tmp_path, capsys, what):
    plant, word = PLANTED[what]
    cache = ReferenceCache(tmp_path / "cache")
    arrays = {"out:x": np.arange(6.0).reshape(2, 3), "layer:conv#1": np.ones(4, np.float32)}
    entry = cache.save("forward", KEY, arrays)
    assert cache.load("forward", KEY) is not None and cache.last_status == "hit"
    capsys.readouterr()
    (entry / "manifest.json").write_text(json.dumps(plant(_manifest(entry))))
    assert cache.load("forward", KEY) is None and cache.last_status == "mismatch"
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cache: {entry}: ") and lines[0].endswith("; recomputing")
    assert word in lines[0]
    # The caller recomputes and saves: the new entry is taken.
    cache.save("forward", KEY, arrays)
    assert cache.load("forward", KEY) is not None and cache.last_status == "hit"


@pytest.mark.parametrize("what", ["truncated", "missing", "another dtype", "another shape", "not npy"])
def test_an_array_file_that_does_not_check_out_is_a_mismatch_named_on_stderr(tmp_path, capsys, what):
    cache = ReferenceCache(tmp_path / "cache")
    entry = cache.save("forward", KEY, {"out:x": np.arange(6.0).reshape(2, 3)})
    file = entry / "00000.npy"
    if what == "truncated":
        file.write_bytes(file.read_bytes()[:-8])
    elif what == "missing":
        file.unlink()
    elif what == "another dtype":
        np.save(file, np.arange(6.0, dtype=np.float32).reshape(2, 3))
    elif what == "another shape":
        np.save(file, np.arange(6.0).reshape(3, 2))
    else:
        file.write_bytes(b"not an array")
    capsys.readouterr()
    assert cache.load("forward", KEY) is None and cache.last_status == "mismatch"
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"cache: {entry}: 00000.npy ")


def test_an_absent_entry_is_a_miss_and_prints_nothing(tmp_path, capsys):
    cache = ReferenceCache(tmp_path / "cache")
    assert cache.load("forward", KEY) is None and cache.last_status == "miss"
    assert capsys.readouterr().err == ""
