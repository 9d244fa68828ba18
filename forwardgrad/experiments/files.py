"""Writing files so that a crash never leaves half of one under its real name.

Every file of a run directory (config, metrics, summary, checkpoints, plots, reports), every
benchmark result and every downloaded data-set file goes through ``atomic_file``: the bytes are
written to a new hidden file created exclusively in the target's own directory, flushed to disk,
and renamed over the target (``os.replace`` is atomic on POSIX and Windows); then the directory
itself is flushed, so that the rename survives a power cut too.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_ATTEMPTS = 100


def _exclusive_temporary(path: Path, binary: bool) -> IO:
    """A new hidden file next to ``path``, created with O_EXCL (``"x"``) so it is never shared.

    It keeps the target's suffix (``.gz``, ``.png``), so what reads it by its name reads it
    the same way; the leading dot and the ``.tmp`` part keep it from ever matching the target.
    """
    for _ in range(_ATTEMPTS):
        temporary = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp{path.suffix}")
        try:
            if binary:
                return open(temporary, "xb")
            return open(temporary, "x", encoding="utf-8", newline="")
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path}.")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, binary: bool = True) -> Iterator[IO]:
    """Open a temporary file that replaces ``path`` when the block ends without an error.

    The file's ``name`` is the temporary path (to check what was written before it counts).
    If the block raises, the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    file = _exclusive_temporary(path, binary)
    temporary = Path(file.name)
    try:
        with file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(path.parent)


def atomic_write(path: str | os.PathLike, content: bytes | str) -> Path:
    """Write ``content`` (text as UTF-8) to ``path`` atomically; returns the path."""
    binary = isinstance(content, bytes)
    with atomic_file(path, binary=binary) as file:
        file.write(content)
    return Path(path)


def write_json(path: str | os.PathLike, values: Any) -> Path:
    """``values`` as indented JSON (no NaN or infinity), written atomically."""
    return atomic_write(path, json.dumps(values, indent=2, allow_nan=False) + "\n")


def open_for_append(path: str | os.PathLike) -> IO:
    """``path`` opened to append text, refusing a symlink (``OSError``) so that appending never
    writes through one to a file outside the directory; for a file ``atomic_file`` just wrote."""
    flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
    descriptor = os.open(path, flags)
    return os.fdopen(descriptor, "a", encoding="utf-8", newline="")


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable; not possible (nor needed) on Windows."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
