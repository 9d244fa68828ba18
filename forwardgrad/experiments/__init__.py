"""The application on top of the library: the paper's problems and data sets, the training loop
that writes run directories, learning-rate sweeps and the paper's experiment table.

    from forwardgrad.experiments import TrainConfig, train
    result = train(TrainConfig(problem="beale", lr=0.01, lr_decay=0.0, steps=200), "runs/beale")
"""

from forwardgrad.errors import CheckpointError, DataError
from forwardgrad.experiments.callbacks import Progress
from forwardgrad.experiments.config import TrainConfig, load_config
from forwardgrad.experiments.datasets import DATASETS, load_dataset
from forwardgrad.experiments.labels import run_label
from forwardgrad.experiments.loop import (
    CheckpointWarning,
    TrainingDiverged,
    TrainingInterrupted,
    TrainResult,
    train,
)
from forwardgrad.experiments.optimizers import OPTIMIZERS
from forwardgrad.experiments.problems import PROBLEMS, make_model, make_test_function
from forwardgrad.experiments.sweep import SweepResult, sweep_learning_rate

__all__ = [
    "DATASETS",
    "OPTIMIZERS",
    "PROBLEMS",
    "CheckpointError",
    "CheckpointWarning",
    "DataError",
    "Progress",
    "SweepResult",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "load_config",
    "load_dataset",
    "make_model",
    "make_test_function",
    "run_label",
    "sweep_learning_rate",
    "train",
]
