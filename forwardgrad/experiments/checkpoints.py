"""Checkpoints that survive crashes: atomic writes, the last two kept, corrupt ones skipped.

A checkpoint file is a small header followed by a `torch.save` payload:

    forwardgrad-checkpoint v1\\n
    <sha256 of the payload, 64 hex digits>\\n
    <payload>

The digest lets `load_latest_checkpoint` tell a truncated or bit-flipped file from a good one,
which `torch.load` alone does not always notice. It proves integrity, not authenticity: anyone who
can write the file can write a matching digest. So the payload holds only tensors and plain
containers (dicts, lists, numbers, strings; the RNG states too) and is read with
`torch.load(weights_only=True)`, which builds no other object and runs no code from the file; a
file that needs more is refused like a corrupt one. Files are written by `files.atomic_file`, so a
crash mid-write never leaves a half-written checkpoint under a real name.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forwardgrad.errors import CheckpointError, ConfigurationError
from forwardgrad.experiments.files import atomic_write

MAGIC = b"forwardgrad-checkpoint v1\n"
KEEP_LAST = 2
_NAME = re.compile(r"^step-(\d{8,})\.ckpt$")


@dataclass
class LoadedCheckpoint:
    """The checkpoint that was loaded, and the newer ones that had to be skipped.

    Attributes:
        state: the dictionary that was saved.
        path: the file it came from.
        step: the training step it was taken at.
        skipped: (path, reason) for every newer checkpoint that was corrupt, newest first.
    """

    state: dict[str, Any]
    path: Path
    step: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """The file name of the checkpoint taken after `step` updates."""
    return Path(directory) / f"step-{step:08d}.ckpt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file in `directory`, newest (highest step) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def save_checkpoint(
    directory: str | os.PathLike, state: dict[str, Any], step: int, keep: int = KEEP_LAST
) -> Path:
    """Write `state` atomically as the checkpoint for `step`, then delete all but the newest `keep`.

    Args:
        directory: the checkpoint directory (created if missing).
        state: tensors and plain containers (what `torch.load(weights_only=True)` reads back).
        step: number of updates applied when the state was captured; names the file.
        keep: how many checkpoints to keep, newest first (at least 1).

    Returns:
        The path of the new checkpoint.
    """
    if keep < 1:
        raise ConfigurationError(
            f"keep must be at least 1 so the new checkpoint survives, got {keep}."
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode("ascii")

    final = atomic_write(checkpoint_path(directory, step), MAGIC + digest + b"\n" + payload)

    for _, old in list_checkpoints(directory)[keep:]:
        old.unlink(missing_ok=True)
    return final


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read one checkpoint file, checking its header and digest.

    Raises:
        CheckpointError: the file is missing, truncated, altered, not a forwardgrad checkpoint,
            or holds objects other than tensors and plain containers.
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error.strerror}.") from None
    if not blob.startswith(MAGIC):
        raise CheckpointError(f"{path} is not a forwardgrad checkpoint (wrong header).")
    header_end = len(MAGIC) + 65
    digest, payload = blob[len(MAGIC) : header_end - 1], blob[header_end:]
    if hashlib.sha256(payload).hexdigest().encode("ascii") != digest:
        raise CheckpointError(f"{path} is corrupt or truncated (its SHA-256 does not match).")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - untrusted bytes: any failure is a refusal
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path} was refused: it holds more than tensors and plain containers ({reason[:200]})."
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint's dict.")
    return state


def load_latest_checkpoint(directory: str | os.PathLike) -> LoadedCheckpoint | None:
    """Load the newest checkpoint in `directory` that is intact, skipping corrupt ones.

    Returns:
        The loaded checkpoint with the list of skipped newer files, or None if there are none.

    Raises:
        CheckpointError: checkpoint files exist but every one of them is corrupt.
    """
    skipped: list[tuple[Path, str]] = []
    for step, path in list_checkpoints(directory):
        try:
            state = read_checkpoint(path)
        except CheckpointError as error:
            skipped.append((path, str(error)))
            continue
        return LoadedCheckpoint(state=state, path=path, step=step, skipped=skipped)
    if skipped:
        reasons = "; ".join(reason for _, reason in skipped)
        raise CheckpointError(
            f"no usable checkpoint in {directory}: {reasons} Delete the directory to start over."
        )
    return None


def capture_rng_state() -> dict[str, Any]:
    """The global random states of torch, numpy and Python as tensors and plain values (what a
    checkpoint may hold), to restore on resume with `restore_rng_state`."""
    # The legacy global state on purpose: it is what user code calling np.random.* draws from.
    name, keys, position, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the global random states captured by `capture_rng_state`."""
    numpy_state, python_state = state["numpy"], state["python"]
    torch.set_rng_state(state["torch"])
    np.random.set_state(  # noqa: NPY002
        (
            numpy_state["bit_generator"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["gauss"],
        )
    )
    internal = tuple(int(value) for value in python_state["internal"].tolist())
    random.setstate((python_state["version"], internal, python_state["gauss_next"]))
