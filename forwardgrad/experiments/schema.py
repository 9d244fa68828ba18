"""What a run directory holds: its file names, the columns of ``metrics.csv`` and the keys of
``summary.json``, written by the training loop and read back by ``forwardgrad.reporting``.

``metrics.csv`` has one row per logged step. Step ``s`` describes the parameters θ_s after ``s``
updates: ``train_loss`` is the loss of mini-batch ``s`` at θ_s, ``time_s`` the training time of
those ``s`` updates, ``lr`` the step size of update ``s + 1``. Test functions add the position
(``distance_to_optimum``, ``x0``, ``x1``); Frank-Wolfe runs add ``fw_gap`` (each update's gap, with
the direction it used) and ``fw_gap_exact`` (the gap with the exact gradient, at evaluation rows).
Empty cells are values that were not measured at that row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
REPORT_FILE = "report.md"
LR_SWEEP_FILE = "lr_sweep.json"

METRIC_COLUMNS = ("step", "time_s", "train_loss", "lr", "test_loss", "test_accuracy")
TEST_FUNCTION_COLUMNS = ("distance_to_optimum", "x0", "x1")
FRANK_WOLFE_COLUMNS = ("fw_gap", "fw_gap_exact")
ALL_METRIC_COLUMNS = METRIC_COLUMNS + TEST_FUNCTION_COLUMNS + FRANK_WOLFE_COLUMNS

# Keys of config.json besides the TrainConfig fields.
CONFIG_RECORD_KEYS = ("versions", "machine", "command", "bytes_communicated_per_step")


def metric_columns(test_function: bool, frank_wolfe: bool) -> tuple[str, ...]:
    """The header of a run's ``metrics.csv``."""
    columns = METRIC_COLUMNS
    if test_function:
        columns += TEST_FUNCTION_COLUMNS
    if frank_wolfe:
        columns += FRANK_WOLFE_COLUMNS
    return columns


def format_cell(value: Any) -> str:
    """A ``metrics.csv`` cell: empty for None, floats at full precision (a resumed run's rows
    must match an uninterrupted run's to the bit)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def parse_cell(text: str | None) -> float:
    """A ``metrics.csv`` cell as a float: NaN where it is empty. Raises ValueError otherwise."""
    text = (text or "").strip()
    return float(text) if text else math.nan


@dataclass
class Summary:
    """``summary.json``: how a run ended.

    ``final_*`` values are None where they were not finite or not measured; ``steps`` is the
    step reached (where it diverged, if ``diverged``); ``peak_memory_bytes`` is measured over
    training steps only, as ``peak_memory_method`` says. ``bytes_communicated_per_step`` is 0 on
    one process. ``final_fw_gap`` and ``final_fw_gap_exact`` exist for Frank-Wolfe runs only.
    """

    problem: str | None = None
    dataset: str | None = None
    estimator: str | None = None
    tangent_rank: int | None = None
    local_losses: bool = False
    guess: str | None = None
    label: str | None = None
    steps: int | None = None
    final_train_loss: float | None = None
    final_test_loss: float | None = None
    final_test_accuracy: float | None = None
    median_step_time_s: float | None = None
    peak_memory_bytes: int | None = None
    peak_memory_method: str | None = None
    lr: float | str | None = None
    lr_selected_by: str | None = None
    world_size: int | None = None
    diverged: bool = False
    final_distance_to_optimum: float | None = None
    bytes_communicated_per_step: int | None = None
    final_fw_gap: float | None = None
    final_fw_gap_exact: float | None = None

    def to_json(self, frank_wolfe: bool) -> dict[str, Any]:
        """The dictionary written to ``summary.json`` (the gap keys only for Frank-Wolfe)."""
        values = asdict(self)
        if not frank_wolfe:
            for key in FRANK_WOLFE_SUMMARY_KEYS:
                del values[key]
        return values

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> Summary:
        """A summary read back; keys it does not know are ignored, missing ones are None."""
        return cls(**{key: values[key] for key in SUMMARY_KEYS if values.get(key) is not None})


SUMMARY_KEYS = tuple(field.name for field in fields(Summary))
FRANK_WOLFE_SUMMARY_KEYS = ("final_fw_gap", "final_fw_gap_exact")


def finite_or_none(value: float | None) -> float | None:
    """``value`` if it is a finite number, else None (JSON has no NaN or infinity)."""
    return value if value is not None and math.isfinite(value) else None
