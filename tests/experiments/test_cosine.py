"""The variance study: the cosine between each estimate and the gradient it targets, logged
during training without changing it."""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import final_params, image_config, install_tiny_dataset, read_metrics
from torch import nn

import forwardgrad as fg
from forwardgrad.errors import ConfigurationError
from forwardgrad.experiments import TrainConfig, TrainingInterrupted, train
from forwardgrad.experiments.config import config_from_dict
from forwardgrad.experiments.cosine import END_TO_END, cosine, cosine_to_target
from forwardgrad.experiments.schema import COSINE_COLUMN

TRAIN_SIZE, TEST_SIZE = 96, 40
LOGREG_PARAMETERS = 28 * 28 * 10 + 10


@pytest.fixture
def tiny_data(tmp_path, monkeypatch) -> Path:
    return install_tiny_dataset(monkeypatch, tmp_path / "data", TRAIN_SIZE, TEST_SIZE)


def cosines(run_dir: Path) -> dict[int, float]:
    """The cosine of each row that has one, by step."""
    rows = read_metrics(run_dir)
    return {int(r["step"]): float(r[COSINE_COLUMN]) for r in rows if r[COSINE_COLUMN]}


def test_backprop_estimate_is_its_target_and_only_due_rows_have_a_cosine(tiny_data, tmp_path):
    config = image_config(tiny_data, estimator="backprop", cosine_every=3, log_every=5)
    train(config, tmp_path / "run")
    found = cosines(tmp_path / "run")
    assert sorted(found) == [0, 3, 6, 9]  # logged at its own interval too, not at step 12
    assert all(value == pytest.approx(1.0, abs=1e-6) for value in found.values())


@pytest.mark.parametrize("guess", [None, "local"])
def test_local_backprop_and_local_guesses_target_their_own_losses(tiny_data, tmp_path, guess):
    estimator = "forward" if guess else "backprop"
    config = image_config(
        tiny_data, problem="mlp", estimator=estimator, local_losses=True, guess=guess,
        steps=3, cosine_every=1, lr=0.01,
    )  # fmt: skip
    train(config, tmp_path / "run")
    found = cosines(tmp_path / "run")
    assert sorted(found) == [0, 1, 2]
    if guess is None:  # local backprop is the exact gradient of the sum of the local losses
        assert all(value == pytest.approx(1.0, abs=1e-6) for value in found.values())
    else:  # a projection onto directions that correlate with the target
        assert all(0 < value <= 1 + 1e-9 for value in found.values())


def test_one_random_tangent_has_the_expected_squared_cosine():
    # For ĝ = (∇L·u) u with u ~ N(0, I_n), cos(ĝ, ∇L) = |∇L·u| / (‖∇L‖ ‖u‖): cos² is the squared
    # first coordinate of a uniform unit vector, Beta(1/2, (n-1)/2), mean 1/n and variance
    # 2(n-1)/(n²(n+2)). Its mean over 400 draws is within 5 standard errors of 1/n.
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    n = sum(p.numel() for p in model.parameters())
    images, labels = torch.randn(8, 4), torch.randint(0, 3, (8,))
    estimator = fg.ForwardGradient(seed=1)
    squares = []
    for _ in range(400):
        model.zero_grad()
        estimator.estimate(model, lambda: nn.functional.cross_entropy(model(images), labels))
        estimate = [p.grad.clone() for p in model.parameters()]
        value = cosine_to_target(model, END_TO_END, (images, labels), estimate)
        assert 0 <= value <= 1 + 1e-12
        squares.append(value**2)
    mean, variance = 1 / n, 2 * (n - 1) / (n**2 * (n + 2))
    assert abs(sum(squares) / len(squares) - mean) < 5 * math.sqrt(variance / len(squares))


def test_forward_gradient_cosines_during_training_are_those_of_one_tangent(tiny_data, tmp_path):
    # cos² ~ Beta(1/2, (n-1)/2) with n = 7,850: P(cos² > 50/n) = P(χ²₁ > 50) < 1e-11.
    config = image_config(tiny_data, estimator="forward", cosine_every=1)
    train(config, tmp_path / "run")
    found = cosines(tmp_path / "run")
    assert sorted(found) == list(range(12))
    assert all(0 < value < math.sqrt(50 / LOGREG_PARAMETERS) for value in found.values())


@pytest.mark.parametrize(
    "changes",
    [
        {"estimator": "forward", "optimizer": "adam"},
        {"estimator": "activity", "problem": "mlp", "steps": 4},
        {"estimator": "zeroth-order", "optimizer": "momentum"},
    ],
    ids=["forward", "activity-mlp", "zeroth-order"],
)
def test_measuring_leaves_training_bit_identical(tiny_data, tmp_path, changes):
    plain = image_config(tiny_data, **changes)
    train(plain, tmp_path / "plain")
    train(image_config(tiny_data, cosine_every=2, **changes), tmp_path / "measured")
    a, b = final_params(tmp_path / "plain"), final_params(tmp_path / "measured")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["train_loss"] for r in read_metrics(tmp_path / d)] for d in ("plain", "measured")]
    assert losses[0] == losses[1]


def test_resume_logs_the_cosines_of_an_uninterrupted_run(tiny_data, tmp_path):
    config = image_config(tiny_data, estimator="forward", cosine_every=2)
    train(config, tmp_path / "straight")

    def interrupt(event) -> None:
        if event.step == 5 and event.train_loss is not None:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as stop:
        train(config, tmp_path / "resumed", interrupt)
    assert stop.value.signal_number == signal.SIGINT
    train(config, tmp_path / "resumed", resume=True)
    assert cosines(tmp_path / "resumed") == cosines(tmp_path / "straight")
    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_test_functions_measure_too(tmp_path):
    config = TrainConfig(problem="rosenbrock", estimator="backprop", lr=1e-3, steps=4,
                         cosine_every=2, threads=1)  # fmt: skip
    train(config, tmp_path / "run")
    found = cosines(tmp_path / "run")
    assert sorted(found) == [0, 2] and all(v == pytest.approx(1.0) for v in found.values())


def test_cosine_every_is_checked_and_old_configs_load():
    with pytest.raises(ConfigurationError, match="cosine_every"):
        TrainConfig(problem="rosenbrock", cosine_every=-1).validate()
    assert config_from_dict({"problem": "rosenbrock", "steps": 5}).cosine_every == 0


def test_cosine_of_parallel_and_opposite_gradients():
    a = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    assert cosine(a, [2 * t for t in a]) == pytest.approx(1.0)
    assert cosine(a, [-t for t in a]) == pytest.approx(-1.0)
    assert cosine([None, torch.tensor([1.0])], [torch.tensor([1.0, 0.0]), None]) == 0.0


def test_measuring_puts_back_random_states_and_buffers_and_leaves_grad():
    # Dropout draws from the global generator and batch norm updates its statistics in a
    # training-mode forward pass: the measurement must undo both.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3))
    images, labels = torch.randn(8, 4), torch.randint(0, 3, (8,))
    fg.Backprop().estimate(model, lambda: nn.functional.cross_entropy(model(images), labels))
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    state = torch.get_rng_state()
    cosine_to_target(model, END_TO_END, (images, labels), grads)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_measuring_is_not_counted_in_step_times(tmp_path, monkeypatch):
    from forwardgrad.experiments import cosine as cosine_module

    def slow(*args):
        time.sleep(0.3)
        return 0.5

    monkeypatch.setattr(cosine_module, "cosine_to_target", slow)
    config = TrainConfig(problem="beale", estimator="backprop", lr=1e-3, steps=3,
                         cosine_every=1, threads=1)  # fmt: skip
    summary = train(config, tmp_path / "run").summary
    assert summary["median_step_time_s"] < 0.15
    assert cosines(tmp_path / "run") == {0: 0.5, 1: 0.5, 2: 0.5}
