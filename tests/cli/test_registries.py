"""One registry per kind, read by the command line, the training loop, the report and the
benchmark alike."""

from __future__ import annotations

import argparse
from types import MappingProxyType

import numpy as np
import pytest

from forwardgrad import bench
from forwardgrad.cli.commands import build_parser
from forwardgrad.estimators import ESTIMATORS
from forwardgrad.experiments import DATASETS, OPTIMIZERS, PROBLEMS, TrainConfig
from forwardgrad.experiments.methods import RUN_ESTIMATORS
from forwardgrad.experiments.problems import TEST_FUNCTION, Problem
from forwardgrad.experiments.schema import ALL_METRIC_COLUMNS, Summary
from forwardgrad.optim.constraints import CONSTRAINT_SETS, CONSTRAINT_SYNTAX, parse_constraint
from forwardgrad.reporting.runs import Run
from forwardgrad.tangents import COMBINERS, DISTRIBUTIONS


def choices(command: str) -> dict[str, list[str]]:
    """Every flag of ``command`` that has choices, with them."""
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    actions = subparsers.choices[command]._actions
    return {a.option_strings[0]: list(a.choices) for a in actions if a.choices}


@pytest.mark.parametrize("command", ["train", "compare"])
def test_the_command_line_offers_what_the_registries_hold(command):
    offered = choices(command)
    assert offered["--problem"] == list(PROBLEMS)
    assert offered["--dataset"] == list(DATASETS)
    assert offered["--distribution"] == list(DISTRIBUTIONS)
    assert offered["--combine"] == list(COMBINERS)
    assert offered["--optimizer"] == list(OPTIMIZERS)
    assert offered["--guess"] == ["local"]
    if command == "train":  # the library's estimators, and activity perturbation
        assert offered["--estimator"] == list(RUN_ESTIMATORS)
        assert list(RUN_ESTIMATORS) == [*ESTIMATORS, "activity"]


def test_every_constraint_set_is_written_and_parsed_by_its_registered_name():
    for name, cls in CONSTRAINT_SETS.items():
        assert f"{name}:" in CONSTRAINT_SYNTAX
        spec = f"{name}:3:2" if name == "k-sparse" else f"{name}:2"
        constraint = parse_constraint(spec)
        assert type(constraint) is cls and str(constraint) == spec


def test_the_benchmark_runs_the_paper_models_of_the_problem_registry():
    image_problems = [name for name, p in PROBLEMS.items() if not p.is_test_function]
    assert list(bench.BenchConfig().models) == image_problems
    assert set(bench.BenchConfig().distributions) <= set(DISTRIBUTIONS)


def test_a_problem_registered_as_a_test_function_is_one_everywhere(monkeypatch, tmp_path):
    sphere = Problem("sphere", TEST_FUNCTION, MappingProxyType({"lr": 0.1}))
    monkeypatch.setitem(PROBLEMS, "sphere", sphere)
    assert TrainConfig(problem="sphere").is_test_function
    metrics = {name: np.array([]) for name in ALL_METRIC_COLUMNS}
    run = Run(tmp_path, {"problem": "sphere"}, summary=Summary(), metrics=metrics)
    assert run.is_test_function
    assert "sphere" in choices("train")["--problem"]
