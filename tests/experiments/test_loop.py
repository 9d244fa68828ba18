"""The training loop: run directory format, exact resume, interrupts, divergence, lr sweep.

Data sets are tiny IDX files written here and registered under the name "tiny" for the test's
duration (the real data sets' sizes and hashes are checked by forwardgrad.experiments.datasets).
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from helpers import final_params, image_config, install_tiny_dataset, read_metrics

from forwardgrad.experiments import (
    CheckpointWarning,
    Progress,
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    load_config,
    sweep_learning_rate,
    train,
)
from forwardgrad.experiments.checkpoints import list_checkpoints, read_checkpoint
from forwardgrad.experiments.optimizers import lr_at

TRAIN_SIZE, TEST_SIZE = 96, 40
CONFIG_KEYS = {
    "problem", "dataset", "dim", "estimator", "tangents", "distribution", "combine", "eps",
    "optimizer", "lr", "lr_decay", "batch_size", "steps", "epochs", "seed", "threads",
    "eval_every", "log_every", "checkpoint_every", "world_size", "versions", "machine", "command",
}  # fmt: skip
SUMMARY_KEYS = {
    "problem", "estimator", "label", "steps", "final_train_loss", "final_test_loss",
    "final_test_accuracy", "median_step_time_s", "peak_memory_bytes", "peak_memory_method", "lr",
    "lr_selected_by", "world_size", "diverged", "final_distance_to_optimum",
}  # fmt: skip


@pytest.fixture
def tiny_data(tmp_path, monkeypatch) -> Path:
    """A data directory holding the "tiny" data set, registered for this test."""
    return install_tiny_dataset(monkeypatch, tmp_path / "data", TRAIN_SIZE, TEST_SIZE)


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def without_time(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


# --------------------------------------------------------------------------- run directory


def test_test_function_run_directory(tmp_path):
    config = TrainConfig(problem="beale", estimator="forward", lr=0.01, lr_decay=0.0, steps=60)
    config.log_every, config.threads = 10, 1
    result = train(config, tmp_path / "run")
    run_dir = result.run_dir

    assert {p.name for p in run_dir.iterdir()} >= {
        "config.json",
        "metrics.csv",
        "summary.json",
        "checkpoints",
    }
    stored = json.loads((run_dir / "config.json").read_text())
    assert CONFIG_KEYS <= stored.keys()
    assert stored["dataset"] is None and stored["threads"] == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary == result.summary
    assert summary["label"] == "forward (K=1, normal, mean)"
    assert summary["steps"] == 60 and summary["diverged"] is False

    with open(run_dir / "metrics.csv", newline="") as file:
        header = next(csv.reader(file))
    assert header == [
        "step", "time_s", "train_loss", "lr", "test_loss", "test_accuracy",
        "distance_to_optimum", "x0", "x1",
    ]  # fmt: skip
    rows = read_metrics(run_dir)
    assert [int(r["step"]) for r in rows] == [0, 10, 20, 30, 40, 50, 60]
    assert float(rows[0]["time_s"]) == 0.0
    assert (float(rows[0]["x0"]), float(rows[0]["x1"])) == (1.0, 1.0)  # Beale's start
    times = [float(r["time_s"]) for r in rows]
    assert times == sorted(times)
    assert all(r["test_loss"] == "" for r in rows)
    # Forward gradient descent on Beale from (1, 1) at lr 0.01 makes progress towards (3, 0.5).
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]) / 5
    assert summary["final_train_loss"] == pytest.approx(float(rows[-1]["train_loss"]))
    assert summary["final_distance_to_optimum"] == pytest.approx(
        float(rows[-1]["distance_to_optimum"])
    )
    assert summary["median_step_time_s"] > 0
    assert summary["peak_memory_bytes"] >= 0 and summary["peak_memory_method"]


def test_image_run_evaluates_at_intervals_and_at_the_end(tiny_data, tmp_path):
    events: list[Progress] = []
    result = train(image_config(tiny_data, estimator="backprop"), tmp_path / "run", events.append)
    rows = read_metrics(result.run_dir)
    assert [int(r["step"]) for r in rows] == list(range(13))
    evaluated = [int(r["step"]) for r in rows if r["test_accuracy"]]
    assert evaluated == [0, 5, 10, 12]
    assert "distance_to_optimum" not in rows[0]
    for row in rows:
        assert float(row["lr"]) == pytest.approx(lr_at(int(row["step"]), 0.05, 1e-4))
    summary = result.summary
    assert 0 <= summary["final_test_accuracy"] <= 1
    assert summary["final_test_loss"] == pytest.approx(float(rows[-1]["test_loss"]))
    # Backprop with lr 0.05 fits the tiny, separable data set.
    assert float(rows[-1]["test_loss"]) < float(rows[0]["test_loss"])
    # Progress: one event before the first step, then one per step.
    assert events[0].train_loss is None and events[0].step == 0
    assert [e.step for e in events[1:]] == list(range(1, 13))
    assert all(e.total_steps == 12 for e in events)
    # Checkpoints every 4 steps, the last two kept.
    assert [s for s, _ in list_checkpoints(result.run_dir / "checkpoints")] == [12, 8]


def test_epochs_set_the_number_of_steps(tiny_data, tmp_path):
    config = image_config(tiny_data, steps=None, epochs=1.5, estimator="backprop", batch_size=32)
    result = train(config, tmp_path / "run")
    assert result.summary["steps"] == math.ceil(1.5 * TRAIN_SIZE / 32)


def test_run_directory_must_be_new(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    config = TrainConfig(problem="beale", steps=2)
    with pytest.raises(ValueError, match="already holds files"):
        train(config, tmp_path / "run")
    with pytest.raises(ValueError, match="no config.json"):
        train(config, tmp_path / "run", resume=True)


def test_lr_schedule_is_the_papers():
    assert lr_at(0, 2e-4, 1e-4) == 2e-4
    assert lr_at(10_000, 2e-4, 1e-4) == pytest.approx(2e-4 / math.e)
    assert lr_at(123, 0.1, 0.0) == 0.1


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"problem": "resnet"}, "problem"),
        ({"estimator": "magic"}, "estimator"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"lr": -1.0}, "lr"),
        ({"lr": 0.0}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"tangents": 0}, "tangents"),
        ({"steps": 0}, "steps"),
        ({"steps": 5, "epochs": 1.0}, "steps and epochs"),
        ({"dataset": "cifar"}, "dataset"),
        ({"distribution": "cauchy"}, "distribution"),
        ({"threads": 0}, "threads"),
        ({"problem": "beale", "dim": 3}, "dim"),
    ],
)
def test_bad_settings_name_the_field(changes, field, tmp_path):
    with pytest.raises((ValueError, TypeError), match=field):
        train(TrainConfig(**changes), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_wrong_types_are_type_errors():
    with pytest.raises(TypeError, match="batch_size must be an integer"):
        TrainConfig(batch_size=6.5).validate()


# --------------------------------------------------------------------------- resume


def interrupt_at(step: int):
    def progress(event: Progress) -> None:
        if event.step == step and event.train_loss is not None:
            raise KeyboardInterrupt

    return progress


@pytest.mark.parametrize(
    "changes",
    [
        {"estimator": "forward", "tangents": 2, "optimizer": "adam"},
        {"estimator": "zeroth-order", "optimizer": "momentum"},
        {"estimator": "backprop", "optimizer": "sgd", "problem": "mlp", "steps": 7},
        {"estimator": "forward", "steps": None, "epochs": 2},
    ],
    ids=["forward-adam", "zeroth-order-momentum", "backprop-mlp", "epochs"],
)
def test_resume_ends_exactly_like_an_uninterrupted_run(tiny_data, tmp_path, changes):
    # 16-example batches over 96 examples: the interruption falls in the middle of epoch 2, so
    # the data order, the estimator's generator and the optimizer state all have to be restored.
    # The resumed run reads its settings from its config.json, as `train --resume` does.
    config = image_config(tiny_data, **changes)
    straight = train(config, tmp_path / "straight")

    with pytest.raises(TrainingInterrupted) as stop:
        train(config, tmp_path / "resumed", interrupt_at(6))
    assert stop.value.step == 6 and stop.value.signal_number == signal.SIGINT
    assert stop.value.checkpoint.name == "step-00000006.ckpt"
    assert not (tmp_path / "resumed" / "summary.json").exists()
    resumed = train(load_config(tmp_path / "resumed"), tmp_path / "resumed", resume=True)

    assert resumed.resumed_from.step == 6
    assert_same_params(final_params(tmp_path / "straight"), final_params(tmp_path / "resumed"))
    assert without_time(read_metrics(tmp_path / "straight")) == without_time(
        read_metrics(tmp_path / "resumed")
    )
    for key in ("final_train_loss", "final_test_loss", "final_test_accuracy", "steps"):
        assert straight.summary[key] == resumed.summary[key]
    times = [float(r["time_s"]) for r in read_metrics(tmp_path / "resumed")]
    assert times == sorted(times)


def test_resume_can_extend_a_finished_run(tmp_path):
    config = TrainConfig(problem="rosenbrock", estimator="forward", lr=1e-3, steps=20, threads=1)
    train(replace_steps(config, 30), tmp_path / "straight")
    train(config, tmp_path / "extended")
    train(replace_steps(config, 30), tmp_path / "extended", resume=True)
    assert_same_params(final_params(tmp_path / "straight"), final_params(tmp_path / "extended"))
    assert without_time(read_metrics(tmp_path / "straight")) == without_time(
        read_metrics(tmp_path / "extended")
    )


def replace_steps(config: TrainConfig, steps: int) -> TrainConfig:
    values = dict(config.__dict__)
    values["steps"] = steps
    return TrainConfig(**values)


def test_sigterm_stops_after_the_step_with_a_checkpoint(tmp_path):
    config = TrainConfig(problem="rosenbrock", lr=1e-3, lr_decay=0.0, steps=50, threads=1)

    def send_sigterm(event: Progress) -> None:
        if event.step == 9 and event.train_loss is not None:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stop:
        train(config, tmp_path / "run", send_sigterm)
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is put back
    assert stop.value.signal_number == signal.SIGTERM and stop.value.step == 9
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [9]
    train(config, tmp_path / "straight")
    train(config, tmp_path / "run", resume=True)
    assert_same_params(final_params(tmp_path / "straight"), final_params(tmp_path / "run"))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tiny_data, tmp_path):
    config = image_config(tiny_data, estimator="forward", checkpoint_every=3)
    train(config, tmp_path / "straight")
    with pytest.raises(TrainingInterrupted):
        train(config, tmp_path / "run", interrupt_at(7))
    checkpoints = dict(list_checkpoints(tmp_path / "run" / "checkpoints"))
    assert sorted(checkpoints) == [6, 7]
    checkpoints[7].write_bytes(checkpoints[7].read_bytes()[:-100])  # truncated

    with pytest.warns(CheckpointWarning, match="step-00000007.ckpt"):
        result = train(config, tmp_path / "run", resume=True)
    assert result.resumed_from.step == 6
    assert [path.name for path, _ in result.resumed_from.skipped] == ["step-00000007.ckpt"]
    assert_same_params(final_params(tmp_path / "straight"), final_params(tmp_path / "run"))
    assert without_time(read_metrics(tmp_path / "straight")) == without_time(
        read_metrics(tmp_path / "run")
    )


def test_resume_without_checkpoint_starts_over(tmp_path):
    config = TrainConfig(problem="beale", lr=0.01, steps=5, threads=1)
    train(config, tmp_path / "run")
    for _, path in list_checkpoints(tmp_path / "run" / "checkpoints"):
        path.unlink()
    with pytest.warns(CheckpointWarning, match="starts again from step 0"):
        result = train(config, tmp_path / "run", resume=True)
    assert result.resumed_from is None
    assert [int(r["step"]) for r in read_metrics(tmp_path / "run")] == [0, 5]


# --------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("estimator", ["backprop", "forward", "zeroth-order"])
def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, estimator):
    # Gradient descent on Rosenbrock at lr 0.1 overshoots: |x| grows like x³ until it overflows.
    # Zeroth-order's finite differences cancel to zero in float32 once |x| is large, so at lr
    # 0.1 it may stall at a huge finite loss instead; at lr 1 it overflows first.
    lr = 1.0 if estimator == "zeroth-order" else 0.1
    config = TrainConfig(
        problem="rosenbrock", estimator=estimator, lr=lr, lr_decay=0.0, steps=200, threads=1
    )
    config.checkpoint_every, config.log_every = 1, 1
    with pytest.raises(TrainingDiverged, match="diverged: the loss became") as error:
        train(config, tmp_path / "run")
    step = error.value.step
    assert 1 < step < 200 and not math.isfinite(error.value.loss)
    assert "lower the learning rate" in str(error.value)

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["diverged"] is True and summary["steps"] == step
    assert summary["final_train_loss"] is None
    rows = read_metrics(tmp_path / "run")
    assert int(rows[-1]["step"]) == step and not math.isfinite(float(rows[-1]["train_loss"]))
    assert all(math.isfinite(float(row["train_loss"])) for row in rows[:-1])
    # The last good checkpoint is kept: the newest whose parameters had a finite loss.
    kept = [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert kept == [step - 1]
    assert error.value.checkpoint == list_checkpoints(tmp_path / "run" / "checkpoints")[0][1]
    assert str(error.value.checkpoint) in str(error.value)
    model = read_checkpoint(error.value.checkpoint)["model"]
    assert all(torch.isfinite(p).all() for p in model.values())


# --------------------------------------------------------------------------- lr sweep


def test_sweep_picks_a_converging_lr_and_scores_divergence_as_inf():
    config = TrainConfig(problem="beale", estimator="backprop", lr_decay=0.0, steps=200)
    result = sweep_learning_rate(config, [1e-4, 1e-2, 10.0], steps=100)
    assert result.scores[10.0] == math.inf
    assert result.scores[1e-2] < result.scores[1e-4]
    assert result.best_lr == 1e-2
    assert "beale" in result.criterion


def test_sweep_scores_on_a_held_out_split(tiny_data):
    config = image_config(tiny_data, estimator="backprop")
    result = sweep_learning_rate(config, [1e-3, 0.5], steps=10, validation_fraction=0.25)
    assert set(result.scores) == {1e-3, 0.5}
    assert all(math.isfinite(s) for s in result.scores.values())
    assert result.best_lr == min(result.scores, key=result.scores.get)
    assert "held-out 25%" in result.criterion
    with pytest.raises(ValueError, match="candidate lr"):
        sweep_learning_rate(config, [-1.0])


def test_interrupting_a_sweep_leaves_nothing_to_resume():
    config = TrainConfig(problem="beale", lr_decay=0.0, steps=50)
    with pytest.raises(TrainingInterrupted) as stop:
        sweep_learning_rate(config, [1e-3, 1e-2], progress=interrupt_at(5))
    assert stop.value.checkpoint is None and stop.value.run_dir is None
    assert "wrote no checkpoint" in str(stop.value)
