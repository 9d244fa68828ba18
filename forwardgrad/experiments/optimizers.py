"""The optimizers a run can use (the registry ``OPTIMIZERS``), their step-size schedules, and
Frank-Wolfe's constraint sets and exact gap."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from forwardgrad.errors import ConfigurationError
from forwardgrad.experiments.checks import check_choice
from forwardgrad.optim.constraints import Constraint, L2Ball, NuclearBall, parse_constraint
from forwardgrad.optim.frank_wolfe import (
    OPEN_LOOP,
    FrankWolfe,
    check_schedule,
    open_loop_step_size,
)

if TYPE_CHECKING:
    from forwardgrad.experiments.config import TrainConfig

FRANK_WOLFE = "frank-wolfe"
# Frank-Wolfe's step size is its own 2/(t+2) unless the user gives a constant in (0, 1].
FRANK_WOLFE_DEFAULTS: dict[str, Any] = {"lr": OPEN_LOOP, "lr_decay": 0.0}

OptimizerFactory = Callable[[list[nn.Parameter], Any, "TrainConfig"], torch.optim.Optimizer]


def _sgd(params: list[nn.Parameter], lr: float, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr)


def _momentum(params: list[nn.Parameter], lr: float, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def _adam(params: list[nn.Parameter], lr: float, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr)


def _frank_wolfe(params: list[nn.Parameter], lr: float | str, config: TrainConfig) -> FrankWolfe:
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
    check_choice("optimizer", config.optimizer, OPTIMIZERS)
    if config.constraint is not None:
        check_constraint_fits(config.constraint, model)
    params = [p for p in model.parameters() if p.requires_grad]
    return OPTIMIZERS[config.optimizer](params, config.lr, config)


# --------------------------------------------------------------------------- step sizes


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


def check_frank_wolfe_step_size(lr: object, lr_decay: object) -> None:
    """Frank-Wolfe keeps its own schedule: lr is ``OPEN_LOOP`` or a constant in (0, 1], no decay."""
    if lr_decay != 0:
        raise ConfigurationError(
            f"frank-wolfe has its own step size, so lr_decay must be 0, got {lr_decay}; "
            f"pass lr_decay=0 with lr={OPEN_LOOP!r} or a constant lr in (0, 1]."
        )
    check_schedule("lr", lr, OPEN_LOOP)


# --------------------------------------------------------------------------- constraint sets


def constraint_for(param: torch.Tensor, spec: str | Constraint) -> Constraint:
    """The set one parameter is kept in: ``spec``, except that under a nuclear-norm ball a 1-D
    parameter (a bias) gets the L2 ball of the same radius, the nuclear ball of that vector seen
    as a 1×n matrix (its only singular value is its L2 norm)."""
    constraint = parse_constraint(spec)
    if isinstance(constraint, NuclearBall) and param.dim() == 1:
        return L2Ball(constraint.radius)
    return constraint


def check_constraint_fits(spec: str | Constraint, model: nn.Module) -> None:
    """Raise ConfigurationError naming the first trainable parameter the set cannot hold."""
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if isinstance(parse_constraint(spec), NuclearBall) and param.dim() > 2:
            raise ConfigurationError(
                f"constraint {str(spec)!r} needs matrix (2-D) parameters, but {name!r} has shape "
                f"{tuple(param.shape)}; choose l1, l2, linf, simplex or k-sparse for this model."
            )
        try:
            constraint_for(param, spec).check_param(param)
        except ConfigurationError as error:
            raise ConfigurationError(
                f"constraint {str(spec)!r} does not fit {name!r}: {error}"
            ) from None


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
