"""``TrainConfig``: every setting of a run, its validation, and reading it back from a run
directory's ``config.json``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from forwardgrad.errors import ConfigurationError
from forwardgrad.estimators import Estimator
from forwardgrad.experiments.checks import (
    ConfigurationTypeError,
    check_choice,
    check_integer,
    check_number,
)
from forwardgrad.experiments.datasets import DATASETS
from forwardgrad.experiments.limits import check_limits, check_tangent_memory
from forwardgrad.experiments.methods import (
    RUN_ESTIMATORS,
    check_method,
    make_run_estimator,
    with_local_losses,
)
from forwardgrad.experiments.optimizers import (
    FRANK_WOLFE,
    OPTIMIZERS,
    check_constraint_fits,
    check_frank_wolfe_step_size,
)
from forwardgrad.experiments.problems import (
    PROBLEMS,
    TestFunctionModel,
    is_test_function,
    make_model,
    make_test_function,
)
from forwardgrad.experiments.rundir import NotARunDirectory, read_json_object
from forwardgrad.experiments.schema import CONFIG_FILE
from forwardgrad.optim.constraints import CONSTRAINT_SYNTAX, parse_constraint


@dataclass
class TrainConfig:
    """Every knob of a run. Defaults are the paper's MNIST setting (Baydin et al. 2022).

    Attributes:
        problem: a key of ``PROBLEMS``: ``beale``, ``rosenbrock`` (test functions) or
            ``logreg``, ``mlp``, ``cnn``.
        dataset: a key of ``DATASETS`` (``mnist``, ``fashion-mnist``, ``kmnist``); ignored (None)
            for test functions.
        dim: dimension of a test function (Rosenbrock in n-D; Beale is 2-D).
        data_dir: where the IDX files are; None: ``FORWARDGRAD_DATA_DIR``, else the user cache.
        estimator: a name of ``methods.RUN_ESTIMATORS``: the library's ``ESTIMATORS``
            (``forward``, ``zeroth-order``, ``backprop``) and ``activity``.
        tangents, distribution, combine, eps: the estimator's settings (see ``make_estimator``).
        tangent_rank: ``forward`` only: None (dense tangents) or r >= 1, structured tangents of
            rank r for every matrix and conv kernel.
        local_losses: train the model as blocks with auxiliary heads and local losses
            (``forward``, ``activity`` or ``backprop``; mlp and cnn; see ``methods``).
        guess: ``forward`` with local losses only: None (random tangents) or ``"local"``
            (local guesses: each block's local-loss gradient as its direction).
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
        cosine_every: every this many steps, log the cosine between the estimate and the exact
            gradient of the loss it targets (``cosine``; untimed, training unchanged); 0: never.
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
    tangent_rank: int | None = None
    local_losses: bool = False
    guess: str | None = None
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
    cosine_every: int = 0
    test_examples: int | None = None
    validation_fraction: float = 0.0
    world_size: int = 1
    lr_selected_by: str = "fixed"

    @property
    def is_test_function(self) -> bool:
        return is_test_function(self.problem)

    @property
    def is_frank_wolfe(self) -> bool:
        return self.optimizer == FRANK_WOLFE

    def validate(self) -> TrainConfig:
        """Check every field; raise ``ConfigurationError`` naming the field and what to pass.

        Returns:
            The config itself, with ``dataset`` set to None for test functions and the
            constraint in its one canonical spelling.
        """
        self._check_names()
        if self.is_frank_wolfe:
            self._check_frank_wolfe()
        else:
            check_number("lr", self.lr, low=0, strict=True)
            if self.constraint is not None or self.fw_averaging is not True:
                which = "constraint" if self.constraint is not None else "fw_averaging=False"
                raise ConfigurationError(
                    f"{which} only applies to optimizer 'frank-wolfe', not {self.optimizer!r}; "
                    "set optimizer='frank-wolfe' (--optimizer frank-wolfe) or drop it."
                )
        self._check_numbers()
        self._check_budget()
        check_method(self)
        check_limits(self)
        build_estimator(self, seed=0)
        if self.is_test_function:
            make_test_function(self.problem, self.dim)
        model = self._meta_model()
        check_tangent_memory(self, model)
        if self.constraint is not None:
            check_constraint_fits(self.constraint, model)
        return self

    def _check_names(self) -> None:
        check_choice("problem", self.problem, PROBLEMS)
        if self.is_test_function:
            self.dataset = None
        else:
            check_choice("dataset", self.dataset, DATASETS)
        check_choice("estimator", self.estimator, RUN_ESTIMATORS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("lr_selected_by", self.lr_selected_by, ("fixed", "sweep"))

    def _check_numbers(self) -> None:
        check_number("lr_decay", self.lr_decay, low=0)
        check_number("eps", self.eps, low=0, strict=True)
        for name in ("dim", "tangents", "batch_size", "world_size"):
            check_integer(name, getattr(self, name), low=1)
        for name in ("eval_every", "log_every", "checkpoint_every", "cosine_every", "seed"):
            check_integer(name, getattr(self, name), low=0)
        for name in ("threads", "test_examples"):
            if getattr(self, name) is not None:
                check_integer(name, getattr(self, name), low=1)
        check_number("validation_fraction", self.validation_fraction, low=0)
        if self.validation_fraction >= 1:
            raise ConfigurationError(
                f"validation_fraction must be below 1, got {self.validation_fraction}; "
                "e.g. 0.1 holds out a tenth of the training set."
            )

    def _check_budget(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ConfigurationError(
                f"set exactly one of steps and epochs, got steps={self.steps} and "
                f"epochs={self.epochs}."
            )
        if self.steps is not None:
            check_integer("steps", self.steps, low=1)
            return
        check_number("epochs", self.epochs, low=0, strict=True)
        if self.is_test_function:
            raise ConfigurationError(f"{self.problem} has no data set, so no epochs; set steps.")

    def _check_frank_wolfe(self) -> None:
        if self.constraint is None:
            raise ConfigurationError(
                "optimizer 'frank-wolfe' needs a constraint set: pass constraint='l1:10' "
                f"(--constraint l1:10), or any of {CONSTRAINT_SYNTAX}."
            )
        if not isinstance(self.constraint, str):
            raise ConfigurationTypeError(
                f"constraint must be a string such as 'l1:10', got "
                f"{type(self.constraint).__name__} (it is written to config.json)."
            )
        self.constraint = str(parse_constraint(self.constraint))  # one spelling per set
        if not isinstance(self.fw_averaging, bool):
            raise ConfigurationTypeError(
                f"fw_averaging must be True or False, got {self.fw_averaging!r}."
            )
        check_frank_wolfe_step_size(self.lr, self.lr_decay)

    def _meta_model(self) -> torch.nn.Module:
        # Parameter shapes alone decide whether a constraint set fits and how much memory the
        # tangents take: the model on the meta device (no memory, no RNG), so a comparison
        # fails before its first run, not later.
        with torch.device("meta"):
            if self.is_test_function:
                return TestFunctionModel(make_test_function(self.problem, self.dim))
            classes = DATASETS[self.dataset].num_classes
            model = make_model(self.problem, classes)
            return with_local_losses(self.problem, model, classes) if self.local_losses else model


def build_estimator(config: TrainConfig, seed: int) -> Estimator:
    """The estimator ``config`` names, with its settings, seeded with ``seed`` (the estimators
    check their own settings and refuse a bad one with a ``ConfigurationError``)."""
    return make_run_estimator(
        config.estimator,
        tangents=config.tangents,
        distribution=config.distribution,
        combine=config.combine,
        eps=config.eps,
        rank=config.tangent_rank,
        guess=config.guess,
        seed=seed,
    )


def config_from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """A TrainConfig from ``config.json`` (keys that are not config fields are ignored).

    ``config.json`` records the step count an epoch budget resolved to beside the epochs; the
    budget is the epochs, so that count is left out (a resume resolves it again)."""
    names = {f.name for f in fields(TrainConfig)}
    kept = {k: v for k, v in values.items() if k in names}
    if kept.get("epochs") is not None:
        kept["steps"] = None
    return TrainConfig(**kept)


def load_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The TrainConfig of an existing run directory, read from its ``config.json``."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise NotARunDirectory(
            f"{run_dir} is not a run directory: it has no config.json; pass the --out "
            "directory of an earlier `forwardgrad train`."
        )
    return config_from_dict(read_json_object(path))
