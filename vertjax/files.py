"""How vertjax writes files: whole or not at all, and as plain JSON.

Every writer in the project (predictions, overlays, CSV, results, reports,
metric logs) goes through `write_atomic`: a reader never sees a half-written
file, and an interrupted run leaves the previous version (or nothing), not
a truncated one. `plain` turns numpy values into what JSON can hold.

Paths may be local or cloud URLs (`gs://bucket/run` on Cloud TPU): `as_path`
gives an `etils.epath.Path` for either, as orbax and TFDS use. An object
store has neither rename nor append, so `write_atomic` uploads in one piece
there (an object appears only once its upload completes) and `append_text`
rewrites the object.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from etils import epath


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_local(path: str | os.PathLike) -> bool:
    """True for a path of this machine's file system, False for a URL like gs://."""
    return "://" not in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path; a local one made absolute (orbax requires that)."""
    return epath.Path(os.path.abspath(path) if is_local(path) else os.fspath(path))


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Writes `data` (text as UTF-8) to a temporary file beside `path`, then
    renames it into place; a cloud object is uploaded in one piece.

    The data and the rename are flushed to disk (fsync) before returning, so
    that a power cut cannot leave an empty file where the old one was.
    """
    if isinstance(data, str):
        data = data.encode()
    if not is_local(path):
        epath.Path(path).write_bytes(data)
        return
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the mode any new file gets.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Makes a rename in `folder` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename still happened
    finally:
        os.close(fd)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Appends `text` to `path` (made if absent); a cloud object is rewritten whole."""
    if is_local(path):
        with open(path, "a") as f:
            f.write(text)
        return
    path = epath.Path(path)
    write_atomic(path, (path.read_text() if path.exists() else "") + text)


def write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 2) -> None:
    """`plain(value)` as JSON (one trailing newline), atomically."""
    write_atomic(path, json.dumps(plain(value), indent=indent) + "\n")


def plain(value: Any) -> Any:
    """A JSON-friendly copy: numpy arrays and scalars to Python, paths to strings,
    non-finite floats to None."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, jax arrays
        value = value.tolist()
        if isinstance(value, list):
            return plain(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; an undefined metric reads as null
    return value


def folder_problem(out: str | os.PathLike) -> str | None:
    """Why `out` cannot be an output folder (a file on its path), or None."""
    out = Path(out)
    for path in (out, *out.parents):
        if path.exists():
            return None if path.is_dir() else f"{path} is a file, not a folder"
    return None
