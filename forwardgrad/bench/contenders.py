"""What the benchmark compares: the problems (the paper's models and deep MLPs), with one random
MNIST-shaped batch, and the contenders, each a way to take one complete training step: backprop,
forward gradients (dense or structured, estimate or ``ForwardSGD``), zeroth-order, and the
local learning methods (activity perturbation, local losses, local guesses, local backprop)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from forwardgrad.errors import ConfigurationError
from forwardgrad.experiments import problems
from forwardgrad.experiments.methods import (
    LOCAL_BLOCKS,
    closure_kind,
    make_closure,
    make_run_estimator,
    with_local_losses,
)
from forwardgrad.optim.forward_sgd import ForwardSGD
from forwardgrad.seeds import derive_seed, seeded_generator

CLASSES = 10  # of every problem's random batch


def deep_mlp(depth: int, width: int = 1024, num_classes: int = 10) -> nn.Sequential:
    """784 -> width (depth hidden layers, ReLU after each) -> classes."""
    return problems.deep_mlp(num_classes, depth, width)


def make_problem(
    model: str, batch: int, depth: int | None = None, width: int = 1024, seed: int = 0
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A model of ``forwardgrad.experiments.problems`` (logreg, mlp, cnn, deep-mlp), the deep
    MLP with ``depth`` hidden layers of ``width`` (default: the problem's), with one random
    MNIST-shaped batch: (model, images, labels)."""
    torch.manual_seed(seed)
    if model == "deep-mlp":
        network = deep_mlp(problems.DEEP_MLP_DEPTH if depth is None else depth, width)
    else:
        network = problems.make_model(model)
    generator = seeded_generator(derive_seed(seed, "batch"))
    images = torch.randn(batch, 1, 28, 28, generator=generator)
    labels = torch.randint(0, CLASSES, (batch,), generator=generator)
    return network, images, labels


@dataclass(frozen=True)
class Contender:
    """One way to take a training step; ``key`` names it in JSON, ``label`` in tables."""

    key: str
    label: str
    estimator: str  # forward, backprop, forward-gradient, forward-sgd, zeroth-order, activity
    tangents: int = 1
    distribution: str = "normal"
    # Memory only: "fresh", .grad freed before the step as optimizer.zero_grad() does; "kept",
    # the buffers of the last step reused, as with zero_grad(set_to_none=False).
    grads: str = "fresh"
    # Structured tangents of this rank for matrices and conv kernels (None: dense).
    rank: int | None = None
    # The model cut into blocks, each trained on its own auxiliary head's loss (local losses),
    # at the problem's natural boundaries; only for problems that have them.
    local: bool = False
    guess: str | None = None  # "local": each block's local-loss gradient as its direction

    def applies_to(self, problem: str) -> bool:
        """Whether this contender can step on ``problem`` (local losses need blocks)."""
        return not self.local or problem in LOCAL_BLOCKS


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

# Local learning: activity perturbation end to end and on local losses, weight-perturbed
# forward gradients on local losses, local guesses, and local backprop (their baseline).
ACTIVITY = Contender("activity", "activity", "activity")
ACTIVITY_LOCAL = Contender("activity:local", "activity + local", "activity", local=True)
LOCAL_GUESS = Contender(
    "forward-gradient:local-guess", "local guesses", "forward-gradient", local=True, guess="local"
)
LOCAL_BACKPROP = Contender("backprop:local", "local backprop", "backprop", local=True)


def forward_gradient_local(distribution: str = "normal") -> Contender:
    """The weight-perturbed forward gradient (K=1) of each block's local loss."""
    return Contender(
        f"forward-gradient:{distribution}:1:local",
        f"FG K=1 {distribution} + local",
        "forward-gradient",
        1,
        distribution,
        local=True,
    )


# The contenders that step through an estimator of ``RUN_ESTIMATORS``, and its name there.
_ESTIMATOR_OF = {
    "backprop": "backprop",
    "forward-gradient": "forward",
    "zeroth-order": "zeroth-order",
    "activity": "activity",
}


def make_step(
    contender: Contender,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: float = 1e-4,
    seed: int = 0,
    problem: str | None = None,
) -> Callable[[], None]:
    """One full training step of ``contender`` on ``model`` (estimate and SGD update); a
    contender with local losses cuts ``model``, of problem ``problem``, into its blocks."""
    kind = contender.estimator
    if kind in ("forward", "forward-sgd") or (kind == "backprop" and contender.grads == "kept"):
        return _plain_step(contender, model, images, labels, lr, seed)
    if kind not in _ESTIMATOR_OF:
        raise ConfigurationError(f"unknown contender kind {kind!r}.")
    if contender.local:
        if not contender.applies_to(problem or ""):
            raise ConfigurationError(
                f"contender {contender.key!r} trains local losses, which need a model of "
                f"blocks: one of {', '.join(LOCAL_BLOCKS)}, not {problem!r}."
            )
        model = with_local_losses(problem, model, CLASSES)
    options = {
        "tangents": contender.tangents,
        "distribution": contender.distribution,
        "seed": seed,
        "rank": contender.rank,
        "guess": contender.guess,
    }
    estimator = make_run_estimator(_ESTIMATOR_OF[kind], **options)
    closure = make_closure(
        closure_kind(_ESTIMATOR_OF[kind], contender.local, contender.guess), model, images, labels
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def step() -> None:
        estimator.estimate(model, closure)
        optimizer.step()

    return step


def _plain_step(contender, model, images, labels, lr, seed) -> Callable[[], None]:
    """The steps that need no estimator: forward only, ``ForwardSGD`` and backprop on kept
    ``.grad`` buffers."""

    def closure() -> torch.Tensor:
        return F.cross_entropy(model(images), labels)

    if contender.estimator == "forward":

        def step() -> None:
            with torch.no_grad():
                closure()

        return step
    if contender.estimator == "forward-sgd":
        sgd = ForwardSGD(
            model, lr, contender.tangents, contender.distribution, seed=seed, rank=contender.rank
        )
        return lambda: sgd.step(closure)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)
        closure().backward()
        optimizer.step()

    return step
