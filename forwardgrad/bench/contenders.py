"""What the benchmark compares: the problems (the paper's models and deep MLPs), with one random
MNIST-shaped batch, and the contenders, each a way to take one complete training step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from forwardgrad.errors import ConfigurationError
from forwardgrad.estimators import make_estimator
from forwardgrad.experiments.problems import make_model
from forwardgrad.optim.forward_sgd import ForwardSGD
from forwardgrad.seeds import derive_seed, seeded_generator


def deep_mlp(depth: int, width: int = 1024, num_classes: int = 10) -> nn.Sequential:
    """784 -> width (depth hidden layers, ReLU after each) -> classes."""
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(28 * 28, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def make_problem(
    model: str, batch: int, depth: int | None = None, width: int = 1024, seed: int = 0
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A model of ``forwardgrad.experiments.problems`` (logreg, mlp, cnn) or ``deep-mlp`` of
    ``depth`` hidden layers, with one random MNIST-shaped batch: (model, images, labels)."""
    torch.manual_seed(seed)
    if model == "deep-mlp":
        if depth is None:
            raise ConfigurationError(
                "deep-mlp needs a depth (number of hidden layers), e.g. depth=4."
            )
        network = deep_mlp(depth, width)
    else:
        network = make_model(model)
    generator = seeded_generator(derive_seed(seed, "batch"))
    images = torch.randn(batch, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    return network, images, labels


@dataclass(frozen=True)
class Contender:
    """One way to take a training step; ``key`` names it in JSON, ``label`` in tables."""

    key: str
    label: str
    estimator: str  # forward, backprop, forward-gradient, forward-sgd, zeroth-order
    tangents: int = 1
    distribution: str = "normal"
    # Memory only: "fresh", .grad freed before the step as optimizer.zero_grad() does; "kept",
    # the buffers of the last step reused, as with zero_grad(set_to_none=False).
    grads: str = "fresh"
    # Structured tangents of this rank for matrices and conv kernels (None: dense).
    rank: int | None = None


FORWARD = Contender("forward", "forward only", "forward")
BACKPROP = Contender("backprop", "backprop", "backprop")
# The usual loop on kept buffers: zero_grad(set_to_none=False), loss.backward(), step().
BACKPROP_KEPT = Contender("backprop:kept", "backprop", "backprop", grads="kept")


def kept(contender: Contender) -> Contender:
    """``contender`` stepping on the ``.grad`` buffers of its last step."""
    return Contender(**{**asdict(contender), "key": contender.key + ":kept", "grads": "kept"})


def _rank_suffix(rank: int | None) -> tuple[str, str]:
    """What a rank adds to a contender's key and label."""
    return ("", "") if rank is None else (f":rank{rank}", f" rank {rank}")


def forward_gradient(tangents: int, distribution: str = "normal", rank: int | None = None):
    key, label = _rank_suffix(rank)
    return Contender(
        f"forward-gradient:{distribution}:{tangents}{key}",
        f"FG K={tangents} {distribution}{label}",
        "forward-gradient",
        tangents,
        distribution,
        rank=rank,
    )


def forward_sgd(distribution: str = "normal", rank: int | None = None) -> Contender:
    key, label = _rank_suffix(rank)
    return Contender(
        f"forward-sgd:{distribution}{key}",
        f"ForwardSGD {distribution}{label}",
        "forward-sgd",
        1,
        distribution,
        rank=rank,
    )


ZEROTH_ORDER = Contender("zeroth-order", "zeroth-order", "zeroth-order")

# The contenders that step through an estimator of the registry, and its name there.
_ESTIMATOR_OF = {
    "backprop": "backprop",
    "forward-gradient": "forward",
    "zeroth-order": "zeroth-order",
}


def make_step(
    contender: Contender,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: float = 1e-4,
    seed: int = 0,
) -> Callable[[], None]:
    """One full training step of ``contender`` on ``model`` (estimate and SGD update)."""

    def closure() -> torch.Tensor:
        return F.cross_entropy(model(images), labels)

    kind = contender.estimator
    if kind == "forward":

        def step() -> None:
            with torch.no_grad():
                closure()

        return step
    if kind == "forward-sgd":
        sgd = ForwardSGD(
            model, lr, contender.tangents, contender.distribution, seed=seed, rank=contender.rank
        )
        return lambda: sgd.step(closure)
    if kind == "backprop" and contender.grads == "kept":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)

        def step() -> None:
            optimizer.zero_grad(set_to_none=False)
            closure().backward()
            optimizer.step()

        return step
    if kind not in _ESTIMATOR_OF:
        raise ConfigurationError(f"unknown contender kind {kind!r}.")
    options = {"tangents": contender.tangents, "seed": seed}
    if kind == "forward-gradient":
        options["distribution"] = contender.distribution
        options["rank"] = contender.rank
    estimator = make_estimator(_ESTIMATOR_OF[kind], **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def step() -> None:
        estimator.estimate(model, closure)
        optimizer.step()

    return step
