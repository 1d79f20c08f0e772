"""Writing a file so that a reader, or a crash, never sees half of it.

Every output of the project goes through :func:`atomic_write`: the content is
written to a temporary file beside the destination (same file system, so the
rename is atomic), flushed to disk, and renamed over the destination. A crash
at any moment leaves either the previous file or the complete new one, plus
at most a temporary file named ``.<name>.<random>.tmp``, which
:func:`remove_stale_temp_files` clears on the next start. A failed write
(permissions, a full disk, a file where a folder should be) raises
:class:`WriteError` naming the path and the cause.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["WriteError", "write_error", "atomic_write", "write_bytes", "write_text", "write_json", "remove_stale_temp_files",
           "check_writable_dir"]

TEMP_SUFFIX = ".tmp"


class WriteError(OSError):
    """A file could not be written (permissions, disk full, a file where a folder should be);
    the message names the path and the cause, and the previous content of the path is intact."""


def write_error(path: os.PathLike | str, err: OSError) -> WriteError:
    """A :class:`WriteError` for ``err`` raised while writing ``path``."""
    return WriteError(f"{path}: cannot write ({err.strerror or err})")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files get the mode a plain open() would give them (mkstemp's are private).
_FILE_MODE = 0o666 & ~_umask()


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the folder entry is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, keep_suffix: bool = False) -> Path:
    """Create or replace ``path`` with what ``write(temporary_name)`` writes.

    ``write`` receives the name of an empty temporary file beside ``path``
    and fills it (any library's save function fits). With ``keep_suffix``
    the temporary name ends in ``path``'s own suffix too
    (``.<name>.<random>.tmp.npy``), for savers that append a missing one. On any exception the
    temporary file is removed and ``path`` keeps its previous content;
    an ``OSError`` becomes a :class:`WriteError` naming ``path``.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = TEMP_SUFFIX + (path.suffix if keep_suffix else "")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
        tmp = None
    except WriteError:
        raise
    except OSError as err:
        raise write_error(path, err) from err
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    _fsync_dir(path.parent)
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def fill(name: str) -> None:
        with open(name, "wb") as f:
            f.write(data)
    return atomic_write(path, fill)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    return write_text(path, json.dumps(obj, indent=indent))


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files interrupted writes left in ``folder``; returns them.

    Only names :func:`atomic_write` makes (``.<name>.<random>.tmp``, or
    ``.<name>.<random>.tmp<suffix>``) are touched.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for candidate in folder.glob(f".*{TEMP_SUFFIX}*"):
        stem = candidate.name[: -len(candidate.suffix)] if not candidate.name.endswith(TEMP_SUFFIX) \
            else candidate.name
        if candidate.is_file() and stem.endswith(TEMP_SUFFIX) and stem.count(".") >= 3:
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
                removed.append(candidate)
    return removed


def check_writable_dir(folder: str | os.PathLike, option: str) -> Path:
    """Prove that files can be written in ``folder`` (or created with it), creating nothing.

    A probe file is created and removed in ``folder``, or, when ``folder`` does
    not exist yet, in its nearest existing ancestor. Raises :class:`WriteError`
    starting with ``option`` and ``folder`` when a file stands where a folder
    is needed, or the probe cannot be written.
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            break
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file, not a folder" if existing == folder else f"its parent {existing} is not a folder"
        raise WriteError(f"{option} {folder}: {what}")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-check.", suffix=TEMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        where = "" if existing == folder else f" (cannot create files in {existing})"
        raise WriteError(f"{option} {folder}: not writable{where}: {err.strerror or err}") from None
    return folder
