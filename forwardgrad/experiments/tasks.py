"""Tasks: what a problem trains on. A task draws the mini-batches (resumably), builds the model,
turns a batch into the closure the estimators call, and evaluates.

Every task has ``steps_per_epoch()``, ``make_model(config)``, ``next_batch()``,
``closure(model, batch)``, ``train_loss(model, batch)`` (the number logged for the final
parameters), ``gap_closure(model)`` (the fixed objective Frank-Wolfe gaps are measured
on), ``evaluate(model)`` (``(loss, accuracy)`` or None), ``position(model)`` (the extra
``metrics.csv`` columns of a test function) and ``state_dict``/``load_state_dict`` (the data
order, for exact resume).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from forwardgrad.experiments.batches import (
    ShuffledBatches,
    normalize,
    pixel_stats,
    split_validation,
)
from forwardgrad.experiments.config import TrainConfig
from forwardgrad.experiments.datasets import load_dataset
from forwardgrad.experiments.methods import (
    logged_loss,
    loss_kind,
    make_closure,
    with_local_losses,
)
from forwardgrad.experiments.problems import (
    TestFunction,
    TestFunctionModel,
    make_model,
    make_test_function,
)

# Frank-Wolfe gaps of image problems are measured on this many training examples (the first).
GAP_EXAMPLES = 2000
EVAL_BATCH_SIZE = 1000


class Task(Protocol):
    """The interface the training loop uses (see the module docstring)."""

    def steps_per_epoch(self) -> int: ...
    def make_model(self, config: TrainConfig) -> nn.Module: ...
    def next_batch(self) -> Any: ...
    def closure(self, model: nn.Module, batch: Any) -> Callable[[], torch.Tensor]: ...
    def train_loss(self, model: nn.Module, batch: Any) -> float: ...
    def gap_closure(self, model: nn.Module) -> Callable[[], torch.Tensor]: ...
    def evaluate(self, model: nn.Module) -> tuple[float, float] | None: ...
    def position(self, model: nn.Module) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ImageClassification:
    """Cross-entropy on mini-batches of a data set's train split; evaluation on its test split
    (or on a held-out part of the train split when ``validation_fraction`` > 0).

    Pixels are normalised with the mean and standard deviation of the training examples only.
    The closure is the one the run's estimator takes (``methods.loss_kind``: the mean loss, one
    loss per example, or the table of local losses of a model with ``local_losses``).
    """

    def __init__(self, config: TrainConfig, download: bool = True):
        data = load_dataset(config.dataset, config.data_dir, download)
        train_images, train_labels = data.train_images, data.train_labels
        if config.validation_fraction > 0:
            kept, held_out = split_validation(
                len(train_labels), config.validation_fraction, config.seed
            )
            eval_images, eval_labels = train_images[held_out], train_labels[held_out]
            train_images, train_labels = train_images[kept], train_labels[kept]
        else:
            eval_images, eval_labels = data.test_images, data.test_labels
        if config.test_examples is not None:
            eval_images = eval_images[: config.test_examples]
            eval_labels = eval_labels[: config.test_examples]
        mean, std = pixel_stats(train_images)
        self.images, self.labels = normalize(train_images, mean, std), train_labels
        self.eval_images, self.eval_labels = normalize(eval_images, mean, std), eval_labels
        self.num_classes = data.num_classes
        self.loss_kind = loss_kind(config)
        self.batches = ShuffledBatches(len(train_labels), config.batch_size, config.seed)
        self._epoch: Iterator[torch.Tensor] | None = None

    def steps_per_epoch(self) -> int:
        return len(self.batches)

    def make_model(self, config: TrainConfig) -> nn.Module:
        model = make_model(config.problem, self.num_classes)
        if config.local_losses:
            return with_local_losses(config.problem, model, self.num_classes)
        return model

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._epoch is None:
            self._epoch = iter(self.batches)
        index = next(self._epoch, None)
        if index is None:  # the epoch is over: the next one reshuffles
            self._epoch = iter(self.batches)
            index = next(self._epoch)
        return self.images[index], self.labels[index]

    def gap_closure(self, model: nn.Module) -> Callable[[], torch.Tensor]:
        """The training loss on the first ``GAP_EXAMPLES`` training examples, a fixed sample of
        the objective on which Frank-Wolfe gaps are compared between runs."""
        images, labels = self.images[:GAP_EXAMPLES], self.labels[:GAP_EXAMPLES]
        return lambda: F.cross_entropy(model(images), labels)

    def closure(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        images, labels = batch
        return make_closure(self.loss_kind, model, images, labels)

    @torch.no_grad()
    def train_loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        """The loss the run's estimator returns, for ``batch``."""
        return logged_loss(self.loss_kind, self.closure(model, batch)())

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) over the evaluation examples."""
        was_training = model.training
        model.eval()
        total_loss, correct = 0.0, 0
        for start in range(0, len(self.eval_labels), EVAL_BATCH_SIZE):
            images = self.eval_images[start : start + EVAL_BATCH_SIZE]
            labels = self.eval_labels[start : start + EVAL_BATCH_SIZE]
            logits = model(images)
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(1) == labels).sum())
        model.train(was_training)
        count = len(self.eval_labels)
        return total_loss / count, correct / count

    @staticmethod
    def position(model: nn.Module) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)
        self._epoch = None


class TestFunctionTask:
    """Minimise a test function from its usual start; there is no data and no test split."""

    __test__ = False  # not a pytest test class

    def __init__(self, config: TrainConfig):
        self.function: TestFunction = make_test_function(config.problem, config.dim)

    def steps_per_epoch(self) -> int:
        return 1

    def make_model(self, config: TrainConfig) -> nn.Module:
        return TestFunctionModel(self.function)

    def next_batch(self) -> None:
        return None

    @staticmethod
    def closure(model: nn.Module, batch: None):
        return model

    @staticmethod
    @torch.no_grad()
    def train_loss(model: nn.Module, batch: None) -> float:
        return float(model())

    @staticmethod
    def gap_closure(model: nn.Module) -> Callable[[], torch.Tensor]:
        return model

    def evaluate(self, model: nn.Module) -> None:
        return None

    @torch.no_grad()
    def position(self, model: nn.Module) -> dict[str, float]:
        x = model.x.detach()
        return {
            "distance_to_optimum": float(torch.linalg.vector_norm(x - self.function.minimizer)),
            "x0": float(x[0]),
            "x1": float(x[1]),
        }

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def make_task(config: TrainConfig, download: bool = True) -> Task:
    """The problem's task: data, model factory, closure, evaluation."""
    if config.is_test_function:
        return TestFunctionTask(config)
    return ImageClassification(config, download)


def total_steps(config: TrainConfig, task: Task) -> int:
    """``config.steps``, or the steps that make ``config.epochs`` passes over the data."""
    if config.steps is not None:
        return config.steps
    return max(1, math.ceil(config.epochs * task.steps_per_epoch()))
