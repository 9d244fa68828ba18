"""metrics.csv and summary.json: what the training loop writes is what reporting reads back."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
from helpers import FRANK_WOLFE, image_config, install_tiny_dataset
from hypothesis import given
from hypothesis import strategies as st

from forwardgrad.experiments import TrainConfig, train
from forwardgrad.experiments.schema import (
    ALL_METRIC_COLUMNS,
    FRANK_WOLFE_SUMMARY_KEYS,
    METRICS_FILE,
    SUMMARY_FILE,
    SUMMARY_KEYS,
    Summary,
    format_cell,
    metric_columns,
    parse_cell,
)
from forwardgrad.reporting import read_run


@given(st.floats(allow_nan=False) | st.integers(-(2**40), 2**40))
def test_a_cell_reads_back_exactly(value):
    assert parse_cell(format_cell(value)) == value


def test_an_empty_cell_is_nan_and_none_is_empty():
    assert format_cell(None) == ""
    assert math.isnan(parse_cell("")) and math.isnan(parse_cell(None))


def written_rows(run_dir) -> tuple[list[str], list[list[str]]]:
    with open(run_dir / METRICS_FILE, newline="") as file:
        header, *rows = list(csv.reader(file))
    return header, rows


def assert_read_back(run_dir, test_function: bool, frank_wolfe: bool) -> None:
    header, rows = written_rows(run_dir)
    assert tuple(header) == metric_columns(test_function, frank_wolfe)
    written = json.loads((run_dir / SUMMARY_FILE).read_text())
    expected_keys = set(SUMMARY_KEYS) - (set() if frank_wolfe else set(FRANK_WOLFE_SUMMARY_KEYS))
    assert set(written) == expected_keys

    run = read_run(run_dir)
    assert run.summary == Summary.from_json(written)
    assert set(run.metrics) == set(ALL_METRIC_COLUMNS)
    unmeasured = {"test_loss", "test_accuracy"} if test_function else set()  # no test split
    for index, name in enumerate(header):  # every written cell, read back as the same number
        values = np.array([parse_cell(row[index]) for row in rows])
        np.testing.assert_array_equal(run.metrics[name], values)
        assert any(row[index] for row in rows) != (name in unmeasured), name
    for name in set(ALL_METRIC_COLUMNS) - set(header):
        assert np.isnan(run.metrics[name]).all()
    assert run.label == written["label"] and run.steps == written["steps"]
    assert run.final_train_loss == written["final_train_loss"]


def test_a_test_function_run_round_trips(tmp_path):
    config = TrainConfig(problem="beale", lr=0.01, lr_decay=0.0, steps=20, log_every=5, threads=1)
    train(config, tmp_path / "run")
    assert_read_back(tmp_path / "run", test_function=True, frank_wolfe=False)


def test_a_frank_wolfe_image_run_round_trips(tmp_path, monkeypatch):
    data = install_tiny_dataset(monkeypatch, tmp_path / "data", 64, 32)
    config = image_config(data, **FRANK_WOLFE, constraint="l1:5", steps=6, eval_every=3)
    train(config, tmp_path / "run")
    assert_read_back(tmp_path / "run", test_function=False, frank_wolfe=True)
    run = read_run(tmp_path / "run")
    assert run.summary.final_fw_gap_exact == run.metrics["fw_gap_exact"][-1]
