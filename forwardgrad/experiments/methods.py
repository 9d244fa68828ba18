"""How a run's estimator settings become an estimator, a model and a closure.

The command line offers the library's registry (``forward``, ``zeroth-order``, ``backprop``)
plus ``activity`` (``ActivityPerturbation``), which needs each example's own loss. Three
settings refine them:

- ``tangent_rank`` r: ``forward`` with structured tangents of rank r on every matrix and conv
  kernel (``ForwardGradient(rank=r)``).
- ``local_losses``: the model is cut into blocks at its natural boundaries (an MLP after each
  hidden layer, the CNN after each conv stage and after its hidden linear layer), each block with
  an auxiliary linear head and a loss of its own (``LocalLosses``). Predictions are the last
  block's output, the model's own. ``forward`` and ``activity`` estimate each block from its own
  loss; ``backprop`` is local backprop. Logistic regression is one layer, hence one block whose
  local loss is the model's own, so it is refused rather than run as a silent no-op.
- ``guess="local"``: ``forward`` with local guesses (each block's local-loss gradient as its
  direction, the model's own loss projected onto it); needs local losses.

The loss a run logs as ``train_loss`` is the one its estimator returns: the mean cross-entropy,
or with local losses the sum of the blocks' local losses Σ_l L_l (with local guesses, the
model's own loss, the one they project).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from forwardgrad.errors import ConfigurationError
from forwardgrad.estimators import ESTIMATORS, ActivityPerturbation, Estimator, LocalLosses
from forwardgrad.experiments.problems import CNN, MLP, is_test_function
from forwardgrad.tangents import STREAMABLE

RUN_ESTIMATORS: dict[str, type[Estimator]] = {
    **ESTIMATORS,
    ActivityPerturbation.name: ActivityPerturbation,
}
# What ``compare`` and ``reproduce`` run when no estimators are named.
COMPARED_BY_DEFAULT: tuple[str, ...] = ("forward", "zeroth-order", "backprop")
GUESSES = ("local",)
LOCAL_ESTIMATORS = ("forward", "activity", "backprop")  # those that train local losses

# The closures a run's estimator takes: the batch's mean loss, one loss per example, the
# (G, B) table of local losses, its sum Σ_l L_l (local backprop), or the table for local
# guesses (which log the model's own loss, the table's last row).
MEAN, PER_EXAMPLE, TABLE, LOCAL_SUM, GUESS_TABLE = (
    "mean",
    "per-example",
    "table",
    "local-sum",
    "guess-table",
)


def make_run_estimator(name: str, **options: Any) -> Estimator:
    """The estimator ``name`` of ``RUN_ESTIMATORS`` with the ``options`` it takes."""
    cls = RUN_ESTIMATORS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigurationError(
            f"unknown estimator {name!r}; choose one of {', '.join(RUN_ESTIMATORS)}."
        )
    return cls(**{k: v for k, v in options.items() if k in cls.options})


def check_method(config) -> None:
    """Refuse settings of ``tangent_rank``, ``local_losses`` and ``guess`` that mean nothing
    for the estimator or problem, in one sentence naming the setting and its flag."""
    _check_types(config)
    estimator, problem = config.estimator, config.problem
    if config.tangent_rank is not None:
        _check_rank(config)
    if config.guess is not None:
        _check_guess(config)
    wants = (
        "local_losses (--local-losses)" if config.local_losses else None,
        "estimator 'activity'" if estimator == "activity" else None,
    )
    for what in filter(None, wants):
        if is_test_function(problem):
            raise ConfigurationError(
                f"{what} needs a network of layers, and {problem} is a test function with "
                "one parameter vector; use it with an MNIST model such as logreg, mlp or cnn."
            )
    if config.local_losses and estimator not in LOCAL_ESTIMATORS:
        raise ConfigurationError(
            f"local_losses (--local-losses) trains with estimator {', '.join(LOCAL_ESTIMATORS)}"
            f", not {estimator!r}; choose one of those or drop --local-losses."
        )
    if config.local_losses and problem not in LOCAL_BLOCKS:
        raise ConfigurationError(
            f"local_losses (--local-losses) cuts the model into blocks, and {problem} has a "
            f"single layer, so its one local loss is its own loss; use it with "
            f"{' or '.join(LOCAL_BLOCKS)}, or drop --local-losses."
        )


def _check_types(config) -> None:
    rank = config.tangent_rank
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigurationError(
            f"tangent_rank (--tangent-rank) must be an integer of at least 1, got {rank!r}: "
            "the rank r of each matrix's tangent (1/√r) Σ_j a_j b_jᵀ."
        )
    if not isinstance(config.local_losses, bool):
        raise ConfigurationError(
            f"local_losses (--local-losses) must be True or False, got {config.local_losses!r}."
        )
    if config.guess is not None and config.guess not in GUESSES:
        raise ConfigurationError(
            f"unknown guess {config.guess!r} (--guess); choose {' or '.join(GUESSES)}, or "
            "leave it unset for random tangents."
        )


def _check_rank(config) -> None:
    if config.estimator != "forward":
        raise ConfigurationError(
            f"tangent_rank (--tangent-rank) shapes the tangents of estimator 'forward' only, "
            f"not {config.estimator!r}; drop it or use --estimator forward."
        )
    if config.distribution not in STREAMABLE:
        raise ConfigurationError(
            f"tangent_rank (--tangent-rank) takes distribution {' or '.join(STREAMABLE)}, not "
            f"{config.distribution!r}: orthogonal directions couple every coordinate."
        )
    if config.combine != "mean":
        raise ConfigurationError(
            f"tangent_rank (--tangent-rank) takes combine 'mean', not {config.combine!r}: the "
            "scaled projection is biased for structured tangents."
        )


def _check_guess(config) -> None:
    if config.estimator != "forward":
        raise ConfigurationError(
            f"guess (--guess local) is an option of estimator 'forward', not "
            f"{config.estimator!r}; drop it or use --estimator forward."
        )
    if not config.local_losses:
        raise ConfigurationError(
            "guess 'local' (--guess local) takes each block's local-loss gradient as its "
            "direction, so it needs local losses; add --local-losses."
        )
    if config.tangent_rank is not None:
        raise ConfigurationError(
            "guess 'local' (--guess local) takes its directions whole, not as structured "
            "tangents; drop --tangent-rank."
        )
    if config.tangents != 1:
        raise ConfigurationError(
            f"guess 'local' (--guess local) takes one direction per block; leave --tangents "
            f"at 1, got {config.tangents}."
        )


def for_estimator(base, name: str, settings: dict[str, Any] | None = None):
    """The run of estimator ``name`` in a comparison with the shared settings ``base``.

    Shared method settings apply to the runs they mean something for: ``tangent_rank`` and
    ``guess`` to ``forward``, ``local_losses`` to the estimators that train local losses on a
    model with blocks (the others run as usual, and their labels say so). A spec's own
    ``settings`` apply as given, and are checked by ``validate``.
    """
    local = base.local_losses and name in LOCAL_ESTIMATORS and base.problem in LOCAL_BLOCKS
    shared = {
        "estimator": name,
        "tangent_rank": base.tangent_rank if name == "forward" else None,
        "local_losses": local,
        "guess": base.guess if name == "forward" and local else None,
    }
    return replace(base, **{**shared, **(settings or {})})


def applies(config) -> bool:
    """Whether the run can be made on its problem at all: activity perturbation and local
    losses need a network, local losses one with several blocks (``reproduce`` leaves the
    others out of the problems they cannot run on)."""
    network = not is_test_function(config.problem)
    if config.estimator == "activity" and not network:
        return False
    return not (config.local_losses or config.guess) or config.problem in LOCAL_BLOCKS


# --------------------------------------------------------------------------- local losses


def _mlp_layers(model: MLP) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), model.fc1, nn.ReLU(), model.fc2, nn.ReLU(), model.fc3)


def _cnn_layers(model: CNN) -> nn.Sequential:
    return nn.Sequential(
        model.conv1, nn.ReLU(), model.conv2, nn.ReLU(), nn.MaxPool2d(2),
        model.conv3, nn.ReLU(), model.conv4, nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), model.fc1, nn.ReLU(), model.fc2,
    )  # fmt: skip


def _hidden_layer_blocks(layers: nn.Sequential) -> list[list[int]]:
    """Each hidden layer of an MLP (its Linear with what comes before it and the ReLU after
    it) as a block, then the output layer as the last."""
    blocks, current = [], []
    for index, layer in enumerate(layers):
        current.append(index)
        if isinstance(layer, nn.ReLU):
            blocks.append(current)
            current = []
    return [*blocks, current] if current else blocks


def _cnn_blocks(layers: nn.Sequential) -> list[list[int]]:
    return [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12], [13]]


# Each model as the nn.Sequential of its layers (sharing its parameters), its blocks (child
# positions) for local losses, and the heads' kind: each hidden layer of an MLP; each conv
# stage of the CNN (heads pool the 64 channels to 2x2 first), then its hidden linear layer.
LOCAL_BLOCKS: dict[
    str,
    tuple[Callable[[nn.Module], nn.Sequential], Callable[[nn.Sequential], list[list[int]]], str],
] = {
    "mlp": (_mlp_layers, _hidden_layer_blocks, "linear"),
    "cnn": (_cnn_layers, _cnn_blocks, "pool"),
    "deep-mlp": (lambda model: model, _hidden_layer_blocks, "linear"),
}
INPUT_SHAPE = (1, 28, 28)


def with_local_losses(problem: str, model: nn.Module, num_classes: int) -> LocalLosses:
    """``model`` (an MLP or CNN of ``problems``) cut into blocks with auxiliary heads; its
    parameters are shared, so it starts from the same initialisation as the plain model."""
    as_layers, blocks_of, head = LOCAL_BLOCKS[problem]
    layers = as_layers(model)
    return LocalLosses(
        layers,
        input_shape=INPUT_SHAPE,
        num_classes=num_classes,
        blocks=blocks_of(layers),
        head=head,
    )


# --------------------------------------------------------------------------- closures


def loss_kind(config) -> str:
    """Which closure the run's estimator takes (see the constants above)."""
    return closure_kind(config.estimator, config.local_losses, config.guess)


def closure_kind(estimator: str, local_losses: bool, guess: str | None = None) -> str:
    """Which closure estimator ``estimator`` of ``RUN_ESTIMATORS`` takes, with or without local
    losses and guesses."""
    if local_losses:
        if estimator == "backprop":
            return LOCAL_SUM
        return GUESS_TABLE if guess is not None else TABLE
    return PER_EXAMPLE if estimator == "activity" else MEAN


def make_closure(
    kind: str, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """The closure of ``kind`` for one batch."""
    if kind == MEAN:
        return lambda: F.cross_entropy(model(images), labels)
    if kind == PER_EXAMPLE:
        return lambda: F.cross_entropy(model(images), labels, reduction="none")
    if kind == LOCAL_SUM:
        return lambda: model.loss(images, labels)
    return lambda: model.losses(images, labels)


def logged_loss(kind: str, value: torch.Tensor) -> float:
    """The number ``train_loss`` logs for a closure's ``value``: what the estimator returns."""
    if kind == PER_EXAMPLE:
        return float(value.mean())
    if kind == TABLE:
        return float(value.mean(1).sum())
    if kind == GUESS_TABLE:
        return float(value[-1].mean())
    return float(value)


__all__ = [
    "COMPARED_BY_DEFAULT",
    "GUESSES",
    "LOCAL_BLOCKS",
    "RUN_ESTIMATORS",
    "applies",
    "check_method",
    "closure_kind",
    "for_estimator",
    "logged_loss",
    "loss_kind",
    "make_closure",
    "make_run_estimator",
    "with_local_losses",
]
