"""The run directory: making or reopening one, and writing its ``config.json``, ``metrics.csv`` and
``summary.json`` (their contents are defined in ``schema``)."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from forwardgrad.errors import ConfigurationError, ForwardGradError
from forwardgrad.experiments.files import atomic_file, open_for_append, write_json
from forwardgrad.experiments.schema import CHECKPOINT_DIR, CONFIG_FILE, format_cell

if TYPE_CHECKING:
    from forwardgrad.experiments.config import TrainConfig


class NotARunDirectory(ConfigurationError, FileNotFoundError):
    """A path given as a run directory is missing, is not one, or cannot take a new run."""


class RunFileError(ForwardGradError, ValueError):
    """A file of a run directory cannot be read: the message names the file and the place."""


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ``RunFileError`` if it is not valid JSON or not an object."""
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RunFileError(
            f"{path} cannot be read as JSON ({error}); rerun or delete that file."
        ) from None
    if not isinstance(values, dict):
        raise RunFileError(f"{path} should hold a JSON object, found {type(values).__name__}.")
    return values


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """Make a new run directory, or check that the one to resume is a run directory."""
    try:
        _prepare_run_dir(run_dir, resume)
    except OSError as error:
        if isinstance(error, NotARunDirectory):
            raise
        raise NotARunDirectory(
            f"cannot use {run_dir} as a run directory: {error.strerror or error}; choose "
            "another directory."
        ) from None


def _prepare_run_dir(run_dir: Path, resume: bool) -> None:
    if resume:
        if not (run_dir / CONFIG_FILE).is_file():
            raise NotARunDirectory(
                f"cannot resume {run_dir}: it has no config.json; pass the directory of an "
                "earlier run (its --out)."
            )
        if (run_dir / CHECKPOINT_DIR).is_symlink():  # checkpoints are written and deleted there
            raise NotARunDirectory(
                f"cannot resume {run_dir}: its {CHECKPOINT_DIR} is a symlink, and a run writes "
                "only inside its own directory; replace the link with the folder it points to."
            )
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise NotARunDirectory(
            f"{run_dir} exists and is not a directory; choose another run directory."
        )
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise NotARunDirectory(
            f"{run_dir} already holds files; continue that run with resume "
            "(forwardgrad train --resume), or choose an empty or new directory."
        )
    run_dir.mkdir(parents=True, exist_ok=True)


def _versions() -> dict[str, str]:
    try:
        version = importlib.metadata.version("forwardgrad")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "forwardgrad": version,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def config_record(
    config: TrainConfig, steps: int, command: Sequence[str] | None, bytes_per_step: int
) -> dict[str, Any]:
    """What ``config.json`` holds: the config (with the resolved step count), the versions and
    machine that ran it, the command line and the bytes expected on the wire per step."""
    values = asdict(config)
    values["steps"] = steps
    values["versions"] = _versions()
    values["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    values["command"] = list(command) if command is not None else None
    values["bytes_communicated_per_step"] = bytes_per_step
    return values


def write_config(
    run_dir: Path,
    config: TrainConfig,
    steps: int,
    command: Sequence[str] | None,
    bytes_per_step: int,
    resume: bool,
) -> None:
    """Write ``config.json``; a resumed run keeps its original command line."""
    if resume:
        command = read_json_object(run_dir / CONFIG_FILE).get("command", command)
    write_json(run_dir / CONFIG_FILE, config_record(config, steps, command, bytes_per_step))


class MetricsLog:
    """``metrics.csv``, one row per logged step; on resume, rows at or after the restart step
    are dropped (they will be logged again) by rewriting the file atomically."""

    def __init__(self, path: Path, columns: Sequence[str], keep_before: int | None):
        self.path, self.columns = path, list(columns)
        kept = self._rows_before(keep_before) if keep_before is not None else []
        with atomic_file(path, binary=False) as file:
            writer = csv.writer(file)
            writer.writerow(self.columns)
            writer.writerows(kept)
        self._file = open_for_append(path)
        self._writer = csv.writer(self._file)

    def _rows_before(self, step: int) -> list[list[str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as file:
            rows = list(csv.reader(file))
        if not rows or rows[0] != self.columns:
            return []
        # A row cut short by a full disk has fewer cells; it is dropped like the rows after it.
        width = len(self.columns)
        return [row for row in rows[1:] if len(row) == width and int(row[0]) < step]

    def write(self, values: dict[str, Any]) -> None:
        self._writer.writerow([format_cell(values.get(column)) for column in self.columns])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class NoMetricsLog:
    """The metrics log of a rank other than 0 in a distributed run: rank 0 writes the file."""

    def write(self, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
