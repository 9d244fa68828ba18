"""Training: one plain loop for every estimator, problem and optimizer, resumable bit for bit.

Each step draws a mini-batch, lets the estimator fill ``.grad`` (forward gradient, zeroth-order
or backprop) and lets a ``torch.optim`` optimizer apply it, with the paper's learning rate

    η_i = η₀ · exp(−i · k)        (i = 0, 1, ... the step; η₀ = 2e-4, k = 1e-4 by default).

A run directory receives ``config.json`` (all that reruns it), ``metrics.csv`` (one row per
logged step), ``summary.json`` and ``checkpoints/``. Step ``s`` in ``metrics.csv`` describes the
parameters θ_s after ``s`` updates: its train loss is the loss of mini-batch ``s`` at θ_s (the
loss the estimator computes for update ``s + 1``), ``time_s`` the wall-clock time of those
``s`` updates alone. Evaluation, logging and checkpointing are not timed.

With ``optimizer="frank-wolfe"`` (``forwardgrad.FrankWolfe``, every parameter kept in
``constraint``) the step size is Frank-Wolfe's own γ_t = 2/(t+2) (or a constant ``lr``), the ``lr``
column logs γ_t, and ``metrics.csv`` adds ``fw_gap`` (each update's gap, with the direction it used)
and ``fw_gap_exact`` (the gap with the exact gradient on a fixed training sample, at evaluation
rows), the measure of how far the iterate is from the constrained optimum.

``train(config, run_dir, resume=True)`` continues from the newest intact checkpoint, which holds
the model, the optimizer, the estimator's generator, the data order and every global RNG, so a
resumed run ends with exactly the parameters of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from forwardgrad.distributed import DEFAULT_CHECK_EVERY, DataParallel, World, weighted
from forwardgrad.errors import EstimatorError, NonFiniteLoss
from forwardgrad.estimators import ESTIMATORS, Estimator, make_estimator
from forwardgrad.experiments import checkpoints as ckpt
from forwardgrad.experiments.datasets import (
    DATASETS,
    ShuffledBatches,
    load_dataset,
    normalize,
    pixel_stats,
    split_validation,
)
from forwardgrad.experiments.problems import (
    MODELS,
    TEST_FUNCTIONS,
    TestFunction,
    TestFunctionModel,
    make_model,
    make_test_function,
)
from forwardgrad.optim.constraints import Constraint, L2Ball, NuclearBall, parse_constraint
from forwardgrad.optim.frank_wolfe import OPEN_LOOP, FrankWolfe, open_loop_step_size

PROBLEMS = (*TEST_FUNCTIONS, *MODELS)
METRIC_COLUMNS = ("step", "time_s", "train_loss", "lr", "test_loss", "test_accuracy")
TEST_FUNCTION_COLUMNS = ("distance_to_optimum", "x0", "x1")
# fw_gap: the gap of each update, with the direction it used (noisy, and not comparable between
# averaged and raw runs); fw_gap_exact: the gap with the exact gradient at evaluation rows.
FRANK_WOLFE_COLUMNS = ("fw_gap", "fw_gap_exact")
GAP_EXAMPLES = 2000
FRANK_WOLFE = "frank-wolfe"
EVAL_BATCH_SIZE = 1000


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped and its last good checkpoint was kept."""

    def __init__(self, message: str, step: int, loss: float, checkpoint: Path | None):
        super().__init__(message)
        self.step, self.loss, self.checkpoint = step, loss, checkpoint


class TrainingInterrupted(Exception):
    """SIGINT, SIGTERM or KeyboardInterrupt stopped the run between two steps, after a checkpoint.

    Attributes:
        step: updates applied, and saved in ``checkpoint``.
        signal_number: ``signal.SIGINT`` or ``signal.SIGTERM``; SIGINT for a KeyboardInterrupt.
        checkpoint: the checkpoint written on the way out; None if there is nothing to resume
            (the parameters were not finite, or the run was a learning-rate sweep's).
        run_dir: the run directory, to pass to ``train(..., resume=True)``; None with no
            checkpoint.
    """

    def __init__(
        self, step: int, signal_number: int, checkpoint: Path | None, run_dir: Path | None
    ):
        name = signal.Signals(signal_number).name
        saved = f"saved {checkpoint}" if checkpoint else "wrote no checkpoint"
        super().__init__(f"{name} received; stopped after step {step} and {saved}.")
        self.step, self.signal_number = step, signal_number
        self.checkpoint, self.run_dir = checkpoint, run_dir


class CheckpointWarning(UserWarning):
    """A corrupt checkpoint was skipped, or a resume found no checkpoint and started over."""


# --------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Every knob of a run. Defaults are the paper's MNIST setting (Baydin et al. 2022).

    Attributes:
        problem: ``beale``, ``rosenbrock`` (test functions) or ``logreg``, ``mlp``, ``cnn``.
        dataset: ``mnist``, ``fashion-mnist`` or ``kmnist``; ignored (None) for test functions.
        dim: dimension of a test function (Rosenbrock in n-D; Beale is 2-D).
        data_dir: where the IDX files are; None: ``FORWARDGRAD_DATA_DIR``, else the user cache.
        estimator: ``forward``, ``zeroth-order`` or ``backprop``.
        tangents, distribution, combine, eps: the estimator's settings (see ``make_estimator``).
        optimizer: a key of ``OPTIMIZERS``: ``sgd``, ``momentum`` (0.9), ``adam`` or
            ``frank-wolfe`` (``forwardgrad.FrankWolfe``, which needs ``constraint``).
        lr: η₀. lr_decay: k in η_i = η₀ exp(−i k); 0 keeps η constant. For ``frank-wolfe``, lr
            is the step size γ_t of x ← x + γ_t (s_t − x): ``"2/(t+2)"`` (the classic schedule)
            or a constant in (0, 1], and lr_decay must be 0 (the schedule is Frank-Wolfe's own).
        constraint: ``frank-wolfe`` only: the set every parameter stays in, as a string such as
            ``"l1:10"`` (see ``forwardgrad.optim.constraints``); each parameter gets its own copy of
            the set. Under ``"nuclear:R"`` a 1-D parameter (a bias) gets the L2 ball of radius
            R, which is the nuclear ball of that vector seen as a 1×n matrix; parameters with
            more than two dimensions (conv kernels) are refused.
        fw_averaging: ``frank-wolfe`` only: feed the oracle a running average of the estimates
            (Rostami & Kia 2024; True) or the latest estimate alone (False).
        batch_size: examples per step (unused by test functions).
        steps: number of updates; or ``epochs`` passes over the training set (set one of them).
        seed: seeds the model's initialisation, the data order and the estimator's tangents, so
            runs with the same seed differ only by their estimator.
        threads: torch CPU threads; None keeps torch's default. Part of the config because the
            thread count changes floating-point summation order, hence the bits of the result.
        eval_every, log_every, checkpoint_every: intervals in steps; 0 means only at the end
            (no periodic checkpoints, but the final one and one on interrupt are still written).
        test_examples: evaluate on the first N test examples only (None: all), to save time.
        validation_fraction: if > 0, hold out this fraction of the training set and evaluate on
            it instead of the test set (learning-rate sweeps).
        world_size: processes training together (1: this process alone).
        lr_selected_by: ``"fixed"`` (given) or ``"sweep"`` (chosen by ``sweep_learning_rate``).
    """

    problem: str = "logreg"
    dataset: str | None = "mnist"
    dim: int = 2
    data_dir: str | None = None
    estimator: str = "forward"
    tangents: int = 1
    distribution: str = "normal"
    combine: str = "mean"
    eps: float = 1e-3
    optimizer: str = "sgd"
    lr: float | str = 2e-4
    lr_decay: float = 1e-4
    constraint: str | None = None
    fw_averaging: bool = True
    batch_size: int = 64
    steps: int | None = 1000
    epochs: float | None = None
    seed: int = 0
    threads: int | None = None
    eval_every: int = 500
    log_every: int = 10
    checkpoint_every: int = 500
    test_examples: int | None = None
    validation_fraction: float = 0.0
    world_size: int = 1
    lr_selected_by: str = "fixed"

    @property
    def is_test_function(self) -> bool:
        return self.problem in TEST_FUNCTIONS

    def validate(self) -> TrainConfig:
        """Check every field; raise ValueError/TypeError naming the field and what to pass.

        Returns:
            The config itself, with ``dataset`` set to None for test functions.
        """
        _check_choice("problem", self.problem, PROBLEMS)
        if self.is_test_function:
            self.dataset = None
        else:
            _check_choice("dataset", self.dataset, tuple(DATASETS))
        _check_choice("estimator", self.estimator, ESTIMATORS)
        _check_choice("optimizer", self.optimizer, tuple(OPTIMIZERS))
        _check_choice("lr_selected_by", self.lr_selected_by, ("fixed", "sweep"))
        if self.optimizer == FRANK_WOLFE:
            self._check_frank_wolfe()
        else:
            _check_number("lr", self.lr, low=0, strict=True)
            if self.constraint is not None or self.fw_averaging is not True:
                which = "constraint" if self.constraint is not None else "fw_averaging=False"
                raise ValueError(
                    f"{which} only applies to optimizer 'frank-wolfe', not {self.optimizer!r}; "
                    "set optimizer='frank-wolfe' (--optimizer frank-wolfe) or drop it."
                )
        _check_number("lr_decay", self.lr_decay, low=0)
        _check_number("eps", self.eps, low=0, strict=True)
        for name in ("dim", "tangents", "batch_size", "world_size"):
            _check_integer(name, getattr(self, name), low=1)
        for name in ("eval_every", "log_every", "checkpoint_every"):
            _check_integer(name, getattr(self, name), low=0)
        _check_integer("seed", self.seed, low=0)
        if self.threads is not None:
            _check_integer("threads", self.threads, low=1)
        if self.test_examples is not None:
            _check_integer("test_examples", self.test_examples, low=1)
        _check_number("validation_fraction", self.validation_fraction, low=0)
        if self.validation_fraction >= 1:
            raise ValueError(
                f"validation_fraction must be below 1, got {self.validation_fraction}; "
                "e.g. 0.1 holds out a tenth of the training set."
            )
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(
                f"set exactly one of steps and epochs, got steps={self.steps} and "
                f"epochs={self.epochs}."
            )
        if self.steps is not None:
            _check_integer("steps", self.steps, low=1)
        else:
            _check_number("epochs", self.epochs, low=0, strict=True)
            if self.is_test_function:
                raise ValueError(f"{self.problem} has no data set, so no epochs; set steps.")
        make_estimator(
            self.estimator, self.tangents, self.distribution, self.combine, self.eps, seed=0
        )
        if self.is_test_function:
            make_test_function(self.problem, self.dim)
        if self.constraint is not None:
            # Parameter shapes alone decide whether the set fits: build the model on the meta
            # device (no memory, no RNG), so a comparison fails before its first run, not later.
            with torch.device("meta"):
                if self.is_test_function:
                    model = TestFunctionModel(make_test_function(self.problem, self.dim))
                else:
                    model = make_model(self.problem, DATASETS[self.dataset].num_classes)
            check_constraint_fits(self.constraint, model)
        return self

    def _check_frank_wolfe(self) -> None:
        if self.constraint is None:
            raise ValueError(
                "optimizer 'frank-wolfe' needs a constraint set: pass constraint='l1:10' "
                "(--constraint l1:10), or l2, linf, simplex, nuclear, k-sparse:K:R."
            )
        if not isinstance(self.constraint, str):
            raise TypeError(
                f"constraint must be a string such as 'l1:10', got "
                f"{type(self.constraint).__name__} (it is written to config.json)."
            )
        self.constraint = str(parse_constraint(self.constraint))  # one spelling per set
        if not isinstance(self.fw_averaging, bool):
            raise TypeError(f"fw_averaging must be True or False, got {self.fw_averaging!r}.")
        if self.lr_decay != 0:
            raise ValueError(
                f"frank-wolfe has its own step size, so lr_decay must be 0, got {self.lr_decay}; "
                f"pass lr_decay=0 with lr={OPEN_LOOP!r} or a constant lr in (0, 1]."
            )
        lr = self.lr
        if lr != OPEN_LOOP:
            number = isinstance(lr, (int, float)) and not isinstance(lr, bool)
            if not number or not math.isfinite(lr) or not 0 < lr <= 1:
                raise ValueError(
                    f"frank-wolfe's step size (lr) must be {OPEN_LOOP!r} or a constant in (0, 1], "
                    f"got {lr!r}; a step outside (0, 1] would leave the constraint set."
                )


def _check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}.")


def _check_number(name: str, value: object, low: float, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    if not math.isfinite(value) or value < low or (strict and value == low):
        bound = f"greater than {low}" if strict else f"at least {low}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}.")


def _check_integer(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}.")


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from ``config.json`` (keys that are not config fields are ignored)."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in names})


def load_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The TrainConfig of an existing run directory, read from its ``config.json``."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ValueError(
            f"{run_dir} is not a run directory: it has no config.json; pass the --out "
            "directory of an earlier `forwardgrad train`."
        )
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} cannot be read as JSON ({error}).") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} should hold a JSON object, found {type(values).__name__}.")
    return config_from_dict(values)


def lr_at(step: int, lr: float, decay: float) -> float:
    """The paper's schedule η_step = η₀ · exp(−step · k)."""
    return lr * math.exp(-step * decay)


def step_size_at(config: TrainConfig, step: int) -> float:
    """The lr of update ``step + 1``: η₀ exp(−step k), or Frank-Wolfe's γ_step.

    Frank-Wolfe's γ_t = 2/(t+2) counts each parameter's own updates, which is ``step`` because
    every parameter is updated at every step (and the count is checkpointed with the optimizer).
    """
    if config.optimizer != FRANK_WOLFE:
        return lr_at(step, config.lr, config.lr_decay)
    return open_loop_step_size(step) if config.lr == OPEN_LOOP else float(config.lr)


def run_label(config: TrainConfig) -> str:
    """What a run is called in reports, e.g. "forward (K=1, normal, mean)"; Frank-Wolfe runs add
    ", Frank-Wolfe averaged" or ", Frank-Wolfe raw" (the estimate fed to the oracle)."""
    label = make_estimator(
        config.estimator, config.tangents, config.distribution, config.combine, config.eps, seed=0
    ).describe()
    if config.optimizer == FRANK_WOLFE:
        label += ", Frank-Wolfe " + ("averaged" if config.fw_averaging else "raw")
    return label


def derive_seed(seed: int, purpose: str) -> int:
    """An independent seed for one purpose (tangents, ...) from the run's seed."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


# --------------------------------------------------------------------------- optimizers

OptimizerFactory = Callable[[list[nn.Parameter], float | str, TrainConfig], torch.optim.Optimizer]


def _sgd(params: list[nn.Parameter], lr: float, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr)


def _momentum(params: list[nn.Parameter], lr: float, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def _adam(params: list[nn.Parameter], lr: float, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr)


def constraint_for(param: torch.Tensor, spec: str | Constraint) -> Constraint:
    """The set one parameter is kept in: ``spec``, except that under a nuclear-norm ball a 1-D
    parameter (a bias) gets the L2 ball of the same radius, the nuclear ball of that vector seen
    as a 1×n matrix (its only singular value is its L2 norm)."""
    constraint = parse_constraint(spec)
    if isinstance(constraint, NuclearBall) and param.dim() == 1:
        return L2Ball(constraint.radius)
    return constraint


def check_constraint_fits(spec: str | Constraint, model: nn.Module) -> None:
    """Raise ValueError naming the first trainable parameter that the set cannot hold."""
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if isinstance(parse_constraint(spec), NuclearBall) and param.dim() > 2:
            raise ValueError(
                f"constraint {str(spec)!r} needs matrix (2-D) parameters, but {name!r} has shape "
                f"{tuple(param.shape)}; choose l1, l2, linf, simplex or k-sparse for this model."
            )
        try:
            constraint_for(param, spec).check_param(param)
        except ValueError as error:
            raise ValueError(f"constraint {str(spec)!r} does not fit {name!r}: {error}") from None


def _frank_wolfe(params: list[nn.Parameter], lr: float | str, config: TrainConfig):
    # One group per set, so biases under "nuclear:R" get their L2 ball.
    groups: dict[str, list[nn.Parameter]] = {}
    for param in params:
        groups.setdefault(str(constraint_for(param, config.constraint)), []).append(param)
    return FrankWolfe(
        [{"params": ps, "constraint": c} for c, ps in groups.items()],
        lr=lr,
        averaging=config.fw_averaging,
    )


# One line per optimizer: a new one is one more entry.
OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd": _sgd,
    "momentum": _momentum,
    "adam": _adam,
    FRANK_WOLFE: _frank_wolfe,
}


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` over the model's trainable parameters at ``config.lr``.

    Frank-Wolfe moves any parameter that starts outside its set onto the set, in place.
    """
    _check_choice("optimizer", config.optimizer, tuple(OPTIMIZERS))
    if config.constraint is not None:
        check_constraint_fits(config.constraint, model)
    params = [p for p in model.parameters() if p.requires_grad]
    return OPTIMIZERS[config.optimizer](params, config.lr, config)


# --------------------------------------------------------------------------- tasks


class ImageClassification:
    """Cross-entropy on mini-batches of a data set's train split; evaluation on its test split
    (or on a held-out part of the train split when ``validation_fraction`` > 0).

    Pixels are normalised with the mean and standard deviation of the training examples only.
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
        self.batches = ShuffledBatches(len(train_labels), config.batch_size, config.seed)
        self._epoch: Iterator[torch.Tensor] | None = None

    def steps_per_epoch(self) -> int:
        return len(self.batches)

    def make_model(self, config: TrainConfig) -> nn.Module:
        return make_model(config.problem, self.num_classes)

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

    @staticmethod
    def closure(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        images, labels = batch
        return lambda: F.cross_entropy(model(images), labels)

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


def make_task(config: TrainConfig, download: bool = True):
    """The problem's task: data, model factory, closure, evaluation."""
    if config.is_test_function:
        return TestFunctionTask(config)
    return ImageClassification(config, download)


def total_steps(config: TrainConfig, task) -> int:
    """``config.steps``, or the steps that make ``config.epochs`` passes over the data."""
    if config.steps is not None:
        return config.steps
    return max(1, math.ceil(config.epochs * task.steps_per_epoch()))


# --------------------------------------------------------------------------- one step


def train_step(
    model: nn.Module,
    estimator: Estimator,
    optimizer: torch.optim.Optimizer,
    closure: Callable[[], torch.Tensor],
) -> float:
    """Estimate the gradient into ``.grad``, apply the optimizer, return the loss before the step.

    Raises:
        NonFiniteLoss: the loss (or a directional derivative) is NaN or infinite; the
            parameters were left as they were.
    """
    loss = float(estimator.estimate(model, closure))
    if not math.isfinite(loss):
        raise NonFiniteLoss(loss, "the loss")
    optimizer.step()
    return loss


def exact_frank_wolfe_gap(optimizer: FrankWolfe, closure: Callable[[], torch.Tensor]) -> float:
    """The Frank-Wolfe gap with the exact gradient, summed over the optimizer's parameters:

        gap(x) = Σ_params <∇f(x), x − lmo(∇f(x))> = max_{s in C} <∇f(x), x − s>  ≥ 0,

    which is 0 exactly at a constrained minimum of a convex f (and bounds f(x) − min f there).
    ∇f comes from backprop on ``closure()``; neither ``.grad`` nor the optimizer's state change.

    Args:
        optimizer: a FrankWolfe optimizer; each group's constraint gives the LMO.
        closure: returns the loss f(x) of the optimizer's parameters.

    Returns:
        The gap, a float.
    """
    groups = [(group["constraint"], group["params"]) for group in optimizer.param_groups]
    params = [param for _, group_params in groups for param in group_params]
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(closure(), params, allow_unused=True))
    gap = 0.0
    with torch.no_grad():
        for constraint, group_params in groups:
            for param, grad in zip(group_params, grads):
                if grad is not None:
                    gap += float(torch.sum(grad * (param - constraint.lmo(grad))))
    return gap


# --------------------------------------------------------------------------- bookkeeping


@dataclass(frozen=True)
class Progress:
    """What the loop reports after every step (and once before the first).

    Attributes:
        step: updates applied so far. total_steps: updates planned. start_step: where this call
        began (non-zero when resuming). train_loss: the latest mini-batch loss (None before the
        first step). lr: the learning rate of the latest step. time_s: training time so far.
        test_loss, test_accuracy: the latest evaluation, if any. label: what is training.
    """

    step: int
    total_steps: int
    start_step: int
    train_loss: float | None
    lr: float
    time_s: float
    test_loss: float | None = None
    test_accuracy: float | None = None
    label: str = ""


@dataclass
class TrainResult:
    """The outcome of ``train``: the run directory, its summary and where it resumed from."""

    run_dir: Path
    summary: dict[str, Any]
    resumed_from: ckpt.LoadedCheckpoint | None = None


class MetricsLog:
    """``metrics.csv``, one row per logged step; on resume, rows at or after the restart step
    are dropped (they will be logged again) by rewriting the file atomically."""

    def __init__(self, path: Path, columns: Sequence[str], keep_before: int | None):
        self.path, self.columns = path, list(columns)
        kept = self._rows_before(keep_before) if keep_before is not None else []
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(self.columns)
            writer.writerows(kept)
        os.replace(temporary, path)
        self._file = open(path, "a", newline="")
        self._writer = csv.writer(self._file)

    def _rows_before(self, step: int) -> list[list[str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as file:
            rows = list(csv.reader(file))
        if not rows or rows[0] != self.columns:
            return []
        return [row for row in rows[1:] if row and int(row[0]) < step]

    def write(self, values: dict[str, Any]) -> None:
        self._writer.writerow([_csv_cell(values.get(column)) for column in self.columns])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _Unlogged:
    """The metrics log of a rank other than 0 in a distributed run: rank 0 writes the file."""

    def write(self, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # full precision, so a resumed run's rows match exactly
    return str(value)


class PeakMemory:
    """Peak resident memory of training steps, above the resident memory when training began.

    On Linux the kernel's high-water mark (VmHWM in /proc/self/status) is read, and reset by
    writing 5 to /proc/self/clear_refs, around every evaluation so that evaluation batches do
    not count. Elsewhere: growth of getrusage's ru_maxrss, which includes evaluation and
    cannot see a peak below an earlier one of the same process.
    """

    def __init__(self):
        self.linux = self._reset_high_water_mark()
        self.method = (
            "peak RSS growth during training steps (Linux VmHWM, reset around evaluation)"
            if self.linux
            else "growth of the process's maximum RSS (getrusage ru_maxrss)"
        )
        self.baseline = self._resident() if self.linux else self._max_resident()
        self.peak = 0

    @staticmethod
    def _status_bytes(field: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"{field} not in /proc/self/status")

    @staticmethod
    def _reset_high_water_mark() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as file:
                file.write("5")
            PeakMemory._status_bytes("VmHWM")
            return True
        except OSError:
            return False

    def _resident(self) -> int:
        return self._status_bytes("VmRSS")

    @staticmethod
    def _max_resident() -> int:
        try:
            import resource
        except ImportError:  # Windows
            return 0
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def pause(self) -> None:
        """Record the peak so far, before work that should not count."""
        current = self._status_bytes("VmHWM") if self.linux else self._max_resident()
        self.peak = max(self.peak, current - self.baseline)

    def resume(self) -> None:
        """Forget the peak of the work since ``pause``."""
        if self.linux:
            self._reset_high_water_mark()


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[int]:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _deferred_signals() -> Iterator[list[int]]:
    """SIGINT and SIGTERM only set a flag, so the loop stops between steps, after a checkpoint.

    A second signal stops at once (KeyboardInterrupt), for a user who does not want to wait.
    Outside the main thread signals cannot be caught; the flag then never rises.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _write_json(path: Path, values: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(values, indent=2, allow_nan=False) + "\n")
    os.replace(temporary, path)


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


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


def _config_json(config: TrainConfig, steps: int, command: Sequence[str] | None) -> dict:
    values = asdict(config)
    values["steps"] = steps
    values["versions"] = _versions()
    values["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    values["command"] = list(command) if command is not None else None
    return values


def _prepare_run_dir(run_dir: Path, resume: bool) -> None:
    if resume:
        if not (run_dir / "config.json").is_file():
            raise ValueError(
                f"cannot resume {run_dir}: it has no config.json; pass the directory of an "
                "earlier run (its --out)."
            )
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir} exists and is not a directory; choose another run directory.")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise ValueError(
            f"{run_dir} already holds files; continue that run with resume "
            "(forwardgrad train --resume), or choose an empty or new directory."
        )
    run_dir.mkdir(parents=True, exist_ok=True)


def _params_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# --------------------------------------------------------------------------- the loop


def train(
    config: TrainConfig,
    run_dir: str | os.PathLike,
    progress: Callable[[Progress], None] | None = None,
    *,
    resume: bool = False,
    download: bool = True,
    command: Sequence[str] | None = None,
    world: World | None = None,
) -> TrainResult:
    """Train one estimator on one problem and write the run directory.

    Args:
        config: the run's settings (validated here).
        run_dir: where config.json, metrics.csv, summary.json and checkpoints/ go. Must be new or
            empty, unless ``resume``.
        progress: called with a ``Progress`` after every step; a KeyboardInterrupt raised by it
            stops the run like SIGINT (after a checkpoint).
        resume: continue the run in ``run_dir`` from its newest intact checkpoint (from step 0
            if it has none). Metrics rows from that step on are replaced.
        download: whether a missing data set may be downloaded.
        command: the command line that started the run, recorded in config.json.
        world: this rank of a distributed job (``forwardgrad.distributed.process_group``), or
            None for one process. Every rank trains on its shard of the same global batches
            and reaches the parameters one process would; only rank 0 writes to ``run_dir``.

    Returns:
        A ``TrainResult`` with the summary written to summary.json.

    Raises:
        TrainingDiverged: the loss became NaN or infinite (summary.json records it).
        TrainingInterrupted: SIGINT/SIGTERM/KeyboardInterrupt; a checkpoint was written first.
        ValueError, TypeError, DataError: bad settings, data or run directory.
    """
    config = replace(config).validate()
    is_main = world is None or world.is_main  # the one process that writes files
    if world is not None:
        config.world_size = world.world_size
    run_dir = Path(run_dir)
    with world.main_first("preparing the run directory") if world else contextlib.nullcontext():
        if is_main or resume:
            _prepare_run_dir(run_dir, resume)
    checkpoint_dir = run_dir / "checkpoints"
    loaded = ckpt.load_latest_checkpoint(checkpoint_dir) if resume else None
    for path, reason in loaded.skipped if loaded and is_main else []:
        warnings.warn(f"skipped {path.name}: {reason}", CheckpointWarning, stacklevel=2)
    if resume and loaded is None and is_main:
        warnings.warn(
            f"{checkpoint_dir} holds no checkpoint; the run starts again from step 0.",
            CheckpointWarning,
            stacklevel=2,
        )

    with _torch_threads(config.threads) as threads, _deferred_signals() as signals:
        config.threads = threads
        with world.main_first("loading the data") if world else contextlib.nullcontext():
            task = make_task(config, download)
        steps = total_steps(config, task)
        torch.manual_seed(config.seed)
        model = task.make_model(config)
        estimator = make_estimator(
            config.estimator,
            config.tangents,
            config.distribution,
            config.combine,
            config.eps,
            seed=derive_seed(config.seed, "tangents"),
        )
        optimizer = make_optimizer(config, model)
        label = run_label(config)

        start, elapsed, step_times, peak_before = 0, 0.0, [], 0
        if loaded is not None:
            state = loaded.state
            start, elapsed = int(state["step"]), float(state["elapsed_s"])
            step_times, peak_before = list(state["step_times_s"]), int(state["peak_memory_bytes"])
            try:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
            except (RuntimeError, KeyError, ValueError) as error:
                raise ckpt.CheckpointError(
                    f"{loaded.path} does not fit this run's model or optimizer ({error})."
                ) from None
            estimator.load_state_dict(state["estimator"])
            task.load_state_dict(state["data"])
            ckpt.restore_rng_state(state["rng"])
        forward_model = model  # the module the closure calls (DDP's wrapper for backprop)
        if world is not None:
            world.check_parameters(model, start)  # same initialisation, or same checkpoint
            estimator = DataParallel(estimator, world)
            forward_model = estimator.prepare(model)
        if start > steps:
            raise ValueError(
                f"{run_dir} was checkpointed at step {start}, beyond the {steps} steps asked for; "
                "ask for at least that many."
            )

        if resume:  # keep the original command line; the rest may have been extended
            previous = json.loads((run_dir / "config.json").read_text())
            command = previous.get("command", command)
        config_values = _config_json(config, steps, command)
        config_values["bytes_communicated_per_step"] = (
            estimator.bytes_per_step(model) if world is not None else 0
        )
        if is_main:
            _write_json(run_dir / "config.json", config_values)
        columns = METRIC_COLUMNS + (TEST_FUNCTION_COLUMNS if config.is_test_function else ())
        frank_wolfe = config.optimizer == FRANK_WOLFE
        if frank_wolfe:
            columns += FRANK_WOLFE_COLUMNS
        log = (
            MetricsLog(run_dir / "metrics.csv", columns, keep_before=start)
            if is_main
            else _Unlogged()
        )
        _warm_up(model, estimator, task)
        memory = PeakMemory()
        last_eval: tuple[float, float] | None = None
        last_loss: float | None = None
        saved_at = loaded.step if loaded else None
        newest_checkpoint = loaded.path if loaded else None

        def save(step: int) -> Path | None:
            nonlocal saved_at, newest_checkpoint
            if saved_at == step or not _params_finite(model) or not is_main:
                return newest_checkpoint
            state = {
                "step": step,
                "elapsed_s": elapsed,
                "step_times_s": step_times,
                "peak_memory_bytes": max(peak_before, memory.peak),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "estimator": estimator.state_dict(),
                "data": task.state_dict(),
                "rng": ckpt.capture_rng_state(),
            }
            newest_checkpoint = ckpt.save_checkpoint(checkpoint_dir, state, step)
            saved_at = step
            return newest_checkpoint

        def evaluate() -> tuple[float, float] | None:
            memory.pause()
            result = task.evaluate(model)
            memory.resume()
            return result

        def exact_gap() -> float | None:
            if not is_main:  # only rank 0 logs it
                return None
            memory.pause()
            gap = exact_frank_wolfe_gap(optimizer, task.gap_closure(model))
            memory.resume()
            return gap

        def report(step: int, lr: float) -> None:
            if progress is None:
                return
            test_loss, test_accuracy = last_eval if last_eval else (None, None)
            progress(
                Progress(
                    step, steps, start, last_loss, lr, elapsed, test_loss, test_accuracy, label
                )
            )

        def stop(step: int, signal_number: int) -> TrainingInterrupted:
            memory.pause()
            return TrainingInterrupted(step, signal_number, save(step), run_dir)

        try:
            report(start, step_size_at(config, start))
            memory.resume()
            for step in range(start, steps):
                lr = step_size_at(config, step)
                if not frank_wolfe:  # Frank-Wolfe keeps its own schedule (set in its groups)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                evaluated = _due(step, config.eval_every) and not config.is_test_function
                if evaluated:
                    last_eval = evaluate()
                row = {"step": step, "time_s": elapsed, "lr": lr, **task.position(model)}
                if evaluated:
                    row["test_loss"], row["test_accuracy"] = last_eval
                if frank_wolfe and (
                    evaluated or (config.is_test_function and _due(step, config.log_every))
                ):
                    row["fw_gap_exact"] = exact_gap()

                started = time.perf_counter()
                batch = task.next_batch()
                if world is None:
                    closure = task.closure(model, batch)
                else:  # this rank's share w_r·L_r of the global batch's mean loss
                    shard, weight = world.shard(batch)
                    closure = weighted(task.closure(forward_model, shard), weight)
                try:
                    last_loss = train_step(model, estimator, optimizer, closure)
                except NonFiniteLoss as error:
                    log.write({**row, "train_loss": error.value})
                    kept = _last_good_checkpoint(checkpoint_dir, step) if is_main else None
                    raise _diverged(config, step, error, lr, kept) from None
                step_time = time.perf_counter() - started
                if frank_wolfe:  # the γ_t and the gap of the step just taken
                    lr = next((g for g in optimizer.last_group_step_sizes if g is not None), lr)
                    row["lr"], row["fw_gap"] = lr, optimizer.last_gap

                if evaluated or _due(step, config.log_every):
                    log.write({**row, "train_loss": last_loss})
                elapsed += step_time
                step_times.append(step_time)
                done = step + 1
                # After the first step (ranks that drew different tangents differ at once), then
                # every few hundred.
                if world is not None and (done == start + 1 or done % DEFAULT_CHECK_EVERY == 0):
                    world.check_parameters(model, done)
                if config.checkpoint_every and done % config.checkpoint_every == 0:
                    memory.pause()
                    save(done)
                    memory.resume()
                try:
                    report(done, lr)
                except KeyboardInterrupt:
                    raise stop(done, signal.SIGINT) from None
                if signals:
                    raise stop(done, signals[0])

            memory.pause()
            if world is not None:
                world.check_parameters(model, steps)
            save(steps)
            # The final row describes θ_steps: a fresh mini-batch's loss and a last evaluation.
            row = {"step": steps, "time_s": elapsed, "lr": step_size_at(config, steps)}
            row.update(task.position(model))
            with torch.no_grad():
                final_loss = float(task.closure(model, task.next_batch())())
            row["train_loss"] = final_loss
            if not config.is_test_function:
                last_eval = task.evaluate(model)
                row["test_loss"], row["test_accuracy"] = last_eval
            if frank_wolfe and is_main:
                row["fw_gap_exact"] = exact_frank_wolfe_gap(optimizer, task.gap_closure(model))
            log.write(row)
        except TrainingDiverged as error:
            memory.pause()
            summary = _summary(
                config, label, error.step, None, last_eval, step_times, memory, peak_before, {}
            )
            summary["diverged"] = True
            summary["bytes_communicated_per_step"] = config_values["bytes_communicated_per_step"]
            if is_main:
                _write_json(run_dir / "summary.json", summary)
            raise
        finally:
            log.close()

    summary = _summary(
        config,
        label,
        steps,
        final_loss,
        last_eval,
        step_times,
        memory,
        peak_before,
        task.position(model),
    )
    # Measured in the last step (config.json holds the count expected from the model).
    summary["bytes_communicated_per_step"] = estimator.bytes_last_step if world is not None else 0
    if frank_wolfe:  # as in metrics.csv: the last update's gap, and the exact one at the end
        summary["final_fw_gap"] = _finite_or_none(optimizer.last_gap)
        summary["final_fw_gap_exact"] = _finite_or_none(row.get("fw_gap_exact"))
    if is_main:
        _write_json(run_dir / "summary.json", summary)
    return TrainResult(run_dir=run_dir, summary=summary, resumed_from=loaded)


def _warm_up(model: nn.Module, estimator: Estimator, task) -> None:
    """One throwaway estimate on a copy of the model, with every random state put back after.

    The first estimate in a process pays one-time costs (lazy imports, kernel selection, the
    allocator's first pools), tens of MB for forward-mode AD; without this they would count as
    the time and peak memory of the first training step.
    """
    estimator_state = copy.deepcopy(estimator.state_dict())
    data_state = copy.deepcopy(task.state_dict())
    rng_state = ckpt.capture_rng_state()
    scratch = copy.deepcopy(model)
    try:
        estimator.estimate(scratch, task.closure(scratch, task.next_batch()))
    except EstimatorError:
        pass  # the real first step meets the same problem and reports it
    finally:
        estimator.load_state_dict(estimator_state)
        task.load_state_dict(data_state)
        ckpt.restore_rng_state(rng_state)


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _last_good_checkpoint(checkpoint_dir: Path, diverged_at: int) -> Path | None:
    """Delete checkpoints of parameters whose loss was not finite; return the newest left.

    A checkpoint is written before the loss of its parameters is known, so the one taken at
    the step that diverged holds finite parameters with an infinite loss: resuming it would
    only diverge again.
    """
    for step, path in ckpt.list_checkpoints(checkpoint_dir):
        if step < diverged_at:
            return path
        path.unlink(missing_ok=True)
    return None


def _diverged(
    config: TrainConfig, step: int, error: NonFiniteLoss, lr: float, checkpoint: Path | None
) -> TrainingDiverged:
    kept = (
        f"its last good checkpoint, {checkpoint}, is kept"
        if checkpoint
        else "no checkpoint had been written yet"
    )
    message = (
        f"training diverged: {error.what} became {error.value} at step {step} (lr {lr:.3g}); "
        f"the run stopped and {kept}; lower the learning rate"
        + (" or use more tangents." if config.estimator != "backprop" else ".")
    )
    return TrainingDiverged(message, step, error.value, checkpoint)


def _summary(
    config: TrainConfig,
    label: str,
    steps: int,
    final_loss: float | None,
    last_eval: tuple[float, float] | None,
    step_times: list[float],
    memory: PeakMemory,
    peak_before: int,
    position: dict[str, float],
) -> dict[str, Any]:
    test_loss, test_accuracy = last_eval if last_eval else (None, None)
    return {
        "problem": config.problem,
        "dataset": config.dataset,
        "estimator": config.estimator,
        "label": label,
        "steps": steps,
        "final_train_loss": _finite_or_none(final_loss),
        "final_test_loss": _finite_or_none(test_loss),
        "final_test_accuracy": test_accuracy,
        "median_step_time_s": statistics.median(step_times) if step_times else None,
        "peak_memory_bytes": max(peak_before, memory.peak),
        "peak_memory_method": memory.method,
        "lr": config.lr,
        "lr_selected_by": config.lr_selected_by,
        "world_size": config.world_size,
        "diverged": False,
        "final_distance_to_optimum": _finite_or_none(position.get("distance_to_optimum")),
    }


# --------------------------------------------------------------------------- learning-rate sweep

DEFAULT_LR_CANDIDATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


@dataclass(frozen=True)
class SweepResult:
    """The learning rate a sweep picked and every candidate's score.

    Attributes:
        best_lr: the candidate with the lowest score (the smallest one if every run diverged).
        scores: candidate -> final loss on the held-out split (test functions: the final value
            of the function); ``inf`` for a run that diverged.
        criterion: what the scores are, in words.
    """

    best_lr: float
    scores: dict[float, float]
    criterion: str


def sweep_learning_rate(
    config: TrainConfig,
    candidates: Sequence[float] = DEFAULT_LR_CANDIDATES,
    *,
    steps: int | None = None,
    validation_fraction: float = 0.1,
    progress: Callable[[Progress], None] | None = None,
    download: bool = True,
) -> SweepResult:
    """Train briefly at each candidate lr and pick the one with the lowest held-out loss.

    For data sets, ``validation_fraction`` of the training set is held out (the test set is
    never looked at) and each candidate is scored by its final loss there. Test functions have
    no data: the score is the function's final value. Runs go to temporary directories.

    Args:
        config: the run to tune; its lr is replaced by each candidate.
        candidates: positive learning rates to try.
        steps: steps per candidate (default: ``config``'s own budget).
        validation_fraction: the held-out part of the training set.
        progress: receives every candidate's progress, labelled with the candidate.
        download: whether a missing data set may be downloaded.

    Returns:
        A ``SweepResult``.
    """
    if not candidates:
        raise ValueError("give at least one candidate learning rate to sweep.")
    for lr in candidates:
        _check_number("candidate lr", lr, low=0, strict=True)
    base = replace(
        config,
        steps=steps if steps is not None else config.steps,
        epochs=None if steps is not None else config.epochs,
        validation_fraction=0.0 if config.is_test_function else validation_fraction,
        eval_every=0,
        checkpoint_every=0,
        lr_selected_by="fixed",
    )
    scores: dict[float, float] = {}
    for lr in candidates:
        labelled = None
        if progress is not None:

            def labelled(event: Progress, lr: float = lr) -> None:
                progress(replace(event, label=f"lr sweep {lr:g}: {event.label}"))

        with tempfile.TemporaryDirectory(prefix="forwardgrad-sweep-") as run_dir:
            try:
                summary = train(replace(base, lr=lr), run_dir, labelled, download=download).summary
            except TrainingDiverged:
                scores[lr] = math.inf
                continue
            except TrainingInterrupted as stop:  # its checkpoint goes with the temporary directory
                raise TrainingInterrupted(stop.step, stop.signal_number, None, None) from None
        key = "final_train_loss" if config.is_test_function else "final_test_loss"
        score = summary[key]
        scores[lr] = math.inf if score is None else float(score)
    best = min(candidates, key=lambda lr: (scores[lr], lr))
    criterion = (
        f"final value of {config.problem}"
        if config.is_test_function
        else f"final loss on a held-out {validation_fraction:.0%} of the training set"
    )
    return SweepResult(best_lr=best, scores=scores, criterion=criterion)
