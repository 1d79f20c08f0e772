"""Provenance of a report: interpreter, machine, package versions, git commit, file digests."""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence


# The checkout whose commit a report records.
REPO_ROOT = Path(__file__).resolve().parents[2]


def package_version(module: str, distributions: Sequence[str]) -> str:
    """The version of ``module`` (as imported, else as installed under one of ``distributions``)."""
    # An already imported module is what actually ran: prefer its own version.
    loaded = sys.modules.get(module)
    if loaded is not None and isinstance(getattr(loaded, "__version__", None), str):
        return loaded.__version__
    from importlib import metadata

    for dist in distributions:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment_info(packages: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Interpreter, machine, package versions, git commit of this checkout, and a UTC timestamp.

    ``packages`` maps a module name to the distribution names it may be
    installed under (Paddle ships as ``paddlepaddle`` or ``paddlepaddle-gpu``).
    """
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    for module, dists in packages.items():
        info[module] = package_version(module, dists)
    commit = _git("rev-parse", "HEAD")
    info["git_commit"] = commit or "unavailable"
    if commit:
        status = _git("status", "--porcelain", "--untracked-files=no")
        info["git_dirty"] = bool(status) if status is not None else "unknown"
    info["timestamp_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return info


def source_digest(*modules: str) -> str:
    """SHA-256 of the source files of ``modules`` (a package: every ``.py`` file under it), for
    cache keys: a change to the code that builds or records a reference invalidates what it
    recorded. A module that cannot be found is a ``ValueError`` naming it."""
    import importlib.util

    digest = hashlib.sha256()
    for module in modules:
        spec = importlib.util.find_spec(module)
        if spec is None:
            raise ValueError(f"no module named {module!r}")
        folders = spec.submodule_search_locations
        files = (sorted((f.relative_to(folder).as_posix(), f) for folder in folders for f in Path(folder).rglob("*.py"))
                 if folders else [("", Path(spec.origin))])
        for name, file in files:
            data = file.read_bytes()
            digest.update(f"{module}/{name}:{len(data)}:".encode())
            digest.update(data)
    return digest.hexdigest()
