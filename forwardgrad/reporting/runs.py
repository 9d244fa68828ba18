"""Reading run directories back: ``config.json``, ``metrics.csv`` and ``summary.json``, as the
training loop writes them (``forwardgrad.experiments.schema``)."""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forwardgrad.errors import ForwardGradError
from forwardgrad.experiments.labels import run_label
from forwardgrad.experiments.optimizers import FRANK_WOLFE
from forwardgrad.experiments.problems import is_test_function
from forwardgrad.experiments.rundir import NotARunDirectory, RunFileError, read_json_object
from forwardgrad.experiments.schema import (
    ALL_METRIC_COLUMNS,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRIC_COLUMNS,
    METRICS_FILE,
    SUMMARY_FILE,
    Summary,
    parse_cell,
)


@dataclass(frozen=True)
class Run:
    """One run directory, read: its config, its summary and its metrics as float columns.

    ``metrics`` maps every column of ``schema.ALL_METRIC_COLUMNS`` to a float array with one
    entry per logged row; empty cells and absent columns are NaN. Fields missing from
    ``summary.json`` (a run that was interrupted before writing it) are derived from the metrics.
    """

    path: Path
    config: dict
    summary: Summary
    metrics: dict[str, np.ndarray]

    def _get(self, key, default=None):
        value = getattr(self.summary, key, None)
        if value is None:
            value = self.config.get(key)
        return default if value is None else value

    @property
    def problem(self) -> str:
        return str(self._get("problem", "unknown"))

    @property
    def estimator(self) -> str:
        return str(self._get("estimator", self.label.split(" ")[0]))

    @property
    def label(self) -> str:
        """E.g. "forward (K=1, normal, mean)": the summary's label, else the config's."""
        if self.summary.label:
            return str(self.summary.label)
        if not self.config.get("estimator"):
            return self.path.name
        try:
            return run_label(self.config)
        except ForwardGradError:  # settings this version does not know
            return str(self.config["estimator"])

    @property
    def is_frank_wolfe(self) -> bool:
        return self.config.get("optimizer") == FRANK_WOLFE

    @property
    def experiment(self) -> str:
        """What runs are compared within: the problem, or e.g. "logreg, Frank-Wolfe in l1:10"."""
        if self.is_frank_wolfe:
            return f"{self.problem}, Frank-Wolfe in {self.config.get('constraint')}"
        return self.problem

    @property
    def lr_text(self) -> str:
        """The lr as reports show it: a number, or a schedule such as "2/(t+2)" (Frank-Wolfe)."""
        value = self._get("lr")
        if isinstance(value, str) and math.isnan(as_number(value)):
            return value
        return format_number(self.lr, ".3g")

    @property
    def lr(self) -> float:
        lr = as_number(self._get("lr"))
        if math.isnan(lr) and len(self.metrics["lr"]):
            lr = float(self.metrics["lr"][0])
        return lr

    @property
    def lr_selected_by(self) -> str:
        return str(self._get("lr_selected_by", "fixed"))

    @property
    def is_test_function(self) -> bool:
        return is_test_function(self.problem) or any_finite(self.metrics["distance_to_optimum"])

    @property
    def dim(self) -> int:
        return int(self.config.get("dim") or 2)

    @property
    def diverged(self) -> bool:
        loss = self.metrics["train_loss"]
        return bool(self.summary.diverged) or bool(np.any(np.isinf(loss) | np.isnan(loss)))

    @property
    def last_finite_row(self) -> int | None:
        """Index of the last row whose train loss is finite (None if there is none)."""
        finite = np.flatnonzero(np.isfinite(self.metrics["train_loss"]))
        return int(finite[-1]) if len(finite) else None

    @property
    def steps(self) -> int:
        steps = self.summary.steps
        if steps is None and len(self.metrics["step"]):
            steps = np.nanmax(self.metrics["step"])
        return int(steps or 0)

    @property
    def final_train_loss(self) -> float:
        loss = as_number(self.summary.final_train_loss)
        if math.isnan(loss) and self.last_finite_row is not None and not self.diverged:
            loss = float(self.metrics["train_loss"][self.last_finite_row])
        return loss

    @property
    def final_test_accuracy(self) -> float:
        accuracy = as_number(self.summary.final_test_accuracy)
        return last_finite(self.metrics["test_accuracy"]) if math.isnan(accuracy) else accuracy

    @property
    def final_distance_to_optimum(self) -> float:
        distance = as_number(self.summary.final_distance_to_optimum)
        if math.isnan(distance):
            distance = last_finite(self.metrics["distance_to_optimum"])
        return distance

    @property
    def median_step_time_s(self) -> float:
        """The summary's median step time; else the median over logged intervals of Δtime/Δstep."""
        median = as_number(self.summary.median_step_time_s)
        if math.isnan(median):
            steps, times = self.metrics["step"], self.metrics["time_s"]
            d_step, d_time = np.diff(steps), np.diff(times)
            ok = (d_step > 0) & np.isfinite(d_time)
            if ok.any():
                median = float(np.median(d_time[ok] / d_step[ok]))
        return median

    @property
    def peak_memory(self) -> tuple[float, str]:
        """(peak memory in bytes, the method that measured it), NaN and "" if not recorded."""
        method = self.summary.peak_memory_method or ""
        return as_number(self.summary.peak_memory_bytes), str(method)

    @property
    def bytes_communicated_per_step(self) -> int | None:
        """Bytes all-reduced per step: measured (summary), else expected (config)."""
        sent = self.summary.bytes_communicated_per_step
        return self.config.get("bytes_communicated_per_step") if sent is None else sent


def read_run(run_dir: str | os.PathLike) -> Run:
    """Read one run directory; only ``metrics.csv`` is required (config and summary are optional).

    Args:
      run_dir: a directory written by ``forwardgrad train`` (or one run of ``compare``).

    Returns:
      A ``Run``.
    """
    path = Path(run_dir)
    metrics_path = path / METRICS_FILE
    if not metrics_path.is_file():
        raise NotARunDirectory(
            f"{path} is not a run directory: it has no metrics.csv; pass a directory written by "
            "`forwardgrad train`, `compare` or `reproduce`."
        )
    return Run(
        path=path,
        config=_read_optional_json(path / CONFIG_FILE),
        summary=Summary.from_json(_read_optional_json(path / SUMMARY_FILE)),
        metrics=read_metrics(metrics_path),
    )


def find_run_dirs(path: str | os.PathLike) -> list[Path]:
    """The run directories at ``path``: itself if it holds metrics.csv, else the ones below it.

    Args:
      path: a run directory, or the ``--out`` directory of ``compare`` / ``reproduce``.

    Returns:
      Run directories, sorted by path.
    """
    path = Path(path)
    if (path / METRICS_FILE).is_file():
        return [path]
    if not path.is_dir():
        raise NotARunDirectory(
            f"{path} does not exist; pass a run directory or a comparison's --out."
        )
    runs = sorted(p.parent for p in path.rglob(METRICS_FILE) if CHECKPOINT_DIR not in p.parts)
    if not runs:
        raise NotARunDirectory(
            f"{path} holds no run directory (no metrics.csv at or below it); pass a directory "
            "written by `forwardgrad train`, `compare` or `reproduce`."
        )
    return runs


def _read_optional_json(path: Path) -> dict:
    return read_json_object(path) if path.is_file() else {}


def read_metrics(path: Path) -> dict[str, np.ndarray]:
    """Every column of ``schema.ALL_METRIC_COLUMNS`` as a float array (NaN: empty or absent)."""
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        if not reader.fieldnames or "step" not in reader.fieldnames:
            raise RunFileError(
                f"{path} has no header with a 'step' column; expected columns "
                f"{','.join(METRIC_COLUMNS)}."
            )
        rows = list(reader)
    columns = {}
    for name in ALL_METRIC_COLUMNS:
        values = []
        for line, row in enumerate(rows, start=2):
            cell = (row.get(name) or "").strip()
            try:
                values.append(parse_cell(cell))
            except ValueError:
                raise RunFileError(
                    f"{path}:{line}: column {name!r} holds {cell!r}, not a number; "
                    "fix or delete that row."
                ) from None
        columns[name] = np.asarray(values, dtype=float)
    return columns


def as_number(value) -> float:
    """``value`` as a float; NaN for None and anything that is not a number."""
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def any_finite(values: np.ndarray) -> bool:
    return bool(np.isfinite(values).any())


def last_finite(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if len(finite) else math.nan


def format_number(value: float, spec: str = ".4g", unit: str = "", missing: str = "—") -> str:
    """``value`` formatted, or ``missing`` where it is None or not finite."""
    return missing if value is None or not math.isfinite(value) else f"{value:{spec}}{unit}"
