"""The paper's problems: the Beale and Rosenbrock test functions and the three MNIST models,
and a deeper MLP (four hidden layers) on which local learning methods are measured.

Baydin et al., *Gradients without Backpropagation* (arXiv 2202.08587), sections on test functions
and MNIST; the model shapes are the paper's. Test functions are plain objects; wrap one in
``TestFunctionModel`` to train it through the same ``nn.Module`` path as the networks.

``PROBLEMS`` is the registry that the training loop, the command line, the report and the
benchmark read: one ``Problem`` per name, saying what kind it is and the settings it trains with
when the user gives none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from forwardgrad.errors import ConfigurationError

__all__ = [
    "CNN",
    "DEEP_MLP_DEPTH",
    "MLP",
    "MODELS",
    "PROBLEMS",
    "Problem",
    "TEST_FUNCTIONS",
    "LogisticRegression",
    "TestFunction",
    "TestFunctionModel",
    "beale",
    "cnn",
    "deep_mlp",
    "logistic_regression",
    "make_model",
    "is_test_function",
    "make_test_function",
    "mlp",
    "rosenbrock",
]


# --------------------------------------------------------------------------- test functions


@dataclass(frozen=True)
class TestFunction:
    """A scalar test function with a known minimum.

    Attributes:
        name: ``"beale"`` or ``"rosenbrock"``.
        fn: ``x (..., n) -> (...)``; a scalar for ``x`` of shape ``(n,)``, a grid of values for a
            grid of points (for contour plots). Plain tensor ops, so autograd and forward-mode AD
            both apply.
        minimizer: the global minimizer, shape ``(n,)``.
        minimum: ``fn(minimizer)``.
        start: the usual starting point of optimisation runs, shape ``(n,)``.
        bounds: ``((x_lo, x_hi), (y_lo, y_hi))`` framing the start and the minimum for contour
            plots; ``None`` above two dimensions.
    """

    __test__ = False  # not a pytest test class, despite its name

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    minimizer: torch.Tensor
    minimum: float
    start: torch.Tensor
    bounds: tuple[tuple[float, float], tuple[float, float]] | None

    @property
    def dim(self) -> int:
        return self.minimizer.numel()


def _beale(x: torch.Tensor) -> torch.Tensor:
    a, b = x[..., 0], x[..., 1]
    return (1.5 - a + a * b) ** 2 + (2.25 - a + a * b**2) ** 2 + (2.625 - a + a * b**3) ** 2


def beale() -> TestFunction:
    """Beale's function (2-D): ``(1.5 - x + xy)² + (2.25 - x + xy²)² + (2.625 - x + xy³)²``.

    Minimum 0 at (3, 0.5). Start (1, 1): the standard starting point of Moré, Garbow & Hillstrom,
    *Testing Unconstrained Optimization Software*, ACM TOMS 7(1), 1981, problem 5. Bounds: the
    usual domain [-4.5, 4.5]².
    """
    return TestFunction(
        name="beale",
        fn=_beale,
        minimizer=torch.tensor([3.0, 0.5]),
        minimum=0.0,
        start=torch.tensor([1.0, 1.0]),
        bounds=((-4.5, 4.5), (-4.5, 4.5)),
    )


def _rosenbrock(x: torch.Tensor) -> torch.Tensor:
    head, tail = x[..., :-1], x[..., 1:]
    return (100 * (tail - head**2) ** 2 + (1 - head) ** 2).sum(-1)


def rosenbrock(n: int = 2) -> TestFunction:
    """Rosenbrock's function (n-D): ``Σ_{i<n} 100 (x_{i+1} - x_i²)² + (1 - x_i)²``.

    Minimum 0 at (1, ..., 1). Start (-1.2, 1, -1.2, 1, ...): Rosenbrock's own starting point
    (-1.2, 1) (Moré, Garbow & Hillstrom 1981, problems 1 and 21), repeated. Bounds in 2-D:
    [-2, 2] x [-1, 3].
    """
    if n < 2:
        raise ConfigurationError(f"rosenbrock needs n >= 2 dimensions, got n={n}.")
    return TestFunction(
        name="rosenbrock",
        fn=_rosenbrock,
        minimizer=torch.ones(n),
        minimum=0.0,
        start=torch.tensor([-1.2, 1.0] * (n // 2) + [-1.2] * (n % 2)),
        bounds=((-2.0, 2.0), (-1.0, 3.0)) if n == 2 else None,
    )


class TestFunctionModel(nn.Module):
    """A test function as an ``nn.Module`` with one parameter ``x``, initialised at ``start``.

    ``model()`` returns ``fn(x)``, so test functions train like networks, with
    ``closure = lambda: model()``.
    """

    __test__ = False  # not a pytest test class, despite its name

    def __init__(self, function: TestFunction, start: torch.Tensor | None = None):
        super().__init__()
        self.function = function
        self.x = nn.Parameter((function.start if start is None else start).detach().clone())

    def forward(self) -> torch.Tensor:
        return self.function.fn(self.x)

    def extra_repr(self) -> str:
        return f"{self.function.name}, dim={self.function.dim}"


def _beale_in(dim: int) -> TestFunction:
    if dim != 2:
        raise ConfigurationError(f"beale is defined in 2 dimensions only, got dim={dim}.")
    return beale()


# Each test function by name, built in a given number of dimensions.
TEST_FUNCTIONS: dict[str, Callable[[int], TestFunction]] = {
    "beale": _beale_in,
    "rosenbrock": rosenbrock,
}


def make_test_function(name: str, dim: int = 2) -> TestFunction:
    """The test function ``name`` in ``dim`` dimensions (Beale exists only in 2)."""
    if name not in TEST_FUNCTIONS:
        raise ConfigurationError(
            f"unknown test function {name!r}; choose one of {', '.join(TEST_FUNCTIONS)}."
        )
    return TEST_FUNCTIONS[name](dim)


# --------------------------------------------------------------------------- MNIST models

# Inputs are (B, 1, 28, 28) float images; the first two models flatten them.
INPUT_PIXELS = 28 * 28


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one linear layer 784 -> classes (logits)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.linear = nn.Linear(INPUT_PIXELS, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(images.flatten(1))


class MLP(nn.Module):
    """784 -> 1024 -> 1024 -> classes, ReLU after each hidden layer."""

    def __init__(self, num_classes: int = 10, hidden: int = 1024):
        super().__init__()
        self.fc1 = nn.Linear(INPUT_PIXELS, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(images.flatten(1)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class CNN(nn.Module):
    """Four 3x3 convolutions of 64 channels (padding 1, ReLU after each), 2x2 max-pool after
    the 2nd and 4th (28 -> 14 -> 7), then linear 64·7·7 = 3136 -> 1024 (ReLU) -> classes."""

    def __init__(self, num_classes: int = 10, channels: int = 64, hidden: int = 1024):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv4 = nn.Conv2d(channels, channels, 3, padding=1)
        self.fc1 = nn.Linear(channels * 7 * 7, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(images))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.conv3(x))
        x = torch.max_pool2d(torch.relu(self.conv4(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def logistic_regression(num_classes: int = 10) -> LogisticRegression:
    """The paper's logistic regression: 7,850 parameters for 10 classes."""
    return LogisticRegression(num_classes)


def mlp(num_classes: int = 10) -> MLP:
    """The paper's MLP: 1,863,690 parameters for 10 classes."""
    return MLP(num_classes)


def cnn(num_classes: int = 10) -> CNN:
    """The paper's CNN: 3,333,962 parameters for 10 classes."""
    return CNN(num_classes)


# Hidden layers of the ``deep-mlp`` problem: twice the paper MLP's, deep enough that the
# variance of a weight-perturbed forward gradient, and what local losses do about it, show.
DEEP_MLP_DEPTH = 4


def deep_mlp(
    num_classes: int = 10, depth: int = DEEP_MLP_DEPTH, width: int = 1024
) -> nn.Sequential:
    """784 -> ``depth`` hidden layers of ``width`` (ReLU after each) -> classes, as one
    ``nn.Sequential`` (Flatten, then Linear and ReLU pairs, then the output Linear); the
    default has 3,962,890 parameters for 10 classes."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ConfigurationError(
            f"a deep MLP needs an integer depth (hidden layers) of at least 1, got {depth!r}."
        )
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(INPUT_PIXELS, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "logreg": logistic_regression,
    "mlp": mlp,
    "cnn": cnn,
    "deep-mlp": deep_mlp,
}


def make_model(name: str, num_classes: int = 10) -> nn.Module:
    """A freshly initialised (PyTorch default init) MNIST model by name: logreg, mlp, cnn or
    deep-mlp."""
    if name not in MODELS:
        raise ConfigurationError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}.")
    return MODELS[name](num_classes)


# --------------------------------------------------------------------------- the registry

TEST_FUNCTION = "test function"
IMAGE_CLASSIFICATION = "image classification"


@dataclass(frozen=True)
class Problem:
    """A problem known by name.

    Attributes:
        name: what ``--problem`` and ``config.json`` call it.
        kind: ``TEST_FUNCTION`` (no data; ``dim`` applies) or ``IMAGE_CLASSIFICATION`` (a model
            trained on a data set).
        defaults: settings (TrainConfig fields) used where the user gives none; the paper's
            MNIST lr 2e-4 barely moves a test function, so those bring their own.
    """

    name: str
    kind: str
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def is_test_function(self) -> bool:
        return self.kind == TEST_FUNCTION


# Plain gradient descent converges at these settings on both test functions.
_TEST_FUNCTION_DEFAULTS = {
    "beale": {"lr": 0.01, "lr_decay": 0.0, "steps": 2000, "log_every": 5},
    "rosenbrock": {"lr": 1e-3, "lr_decay": 0.0, "steps": 5000, "log_every": 10},
}

PROBLEMS: dict[str, Problem] = {
    **{
        name: Problem(name, TEST_FUNCTION, MappingProxyType(_TEST_FUNCTION_DEFAULTS[name]))
        for name in TEST_FUNCTIONS
    },
    **{name: Problem(name, IMAGE_CLASSIFICATION) for name in MODELS},
}


def is_test_function(name: str | None) -> bool:
    """Whether ``name`` is a registered test function (False for unknown names)."""
    problem = PROBLEMS.get(name)  # type: ignore[arg-type]
    return problem is not None and problem.is_test_function
