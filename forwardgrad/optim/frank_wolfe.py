"""Frank-Wolfe with averaged gradient estimates (projected forward-gradient Frank-Wolfe).

Rostami & Kia (2024), "Projected Forward Gradient-Guided Frank-Wolfe Algorithm via Variance
Reduction", feed Frank-Wolfe's linear minimization oracle a running average of forward gradients
instead of the latest one. For every parameter x constrained to a convex set C, step t = 0, 1, ...:

    d_t = (1 - rho_t) d_{t-1} + rho_t g_t        (d_0 = g_0; d_t = g_t without averaging)
    s_t = argmin_{s in C} <d_t, s>               (the set's LMO)
    gap_t = <d_t, x_t - s_t>                     (Frank-Wolfe gap, >= 0)
    x_{t+1} = x_t + gamma_t (s_t - x_t)          (a convex combination: x stays in C)

g_t is whatever the estimator left in `.grad` (forward, zeroth-order or backprop), so every
estimator can drive it. A single forward gradient g = (grad f . v) v has a variance that does not
shrink as x converges, so with d_t = g_t the vertices s_t stay random and the iterates stall at a
distance from the optimum; the average d_t tracks grad f(x_t) ever more closely and restores
convergence.

Schedules (t counts this parameter's steps from 0):
    gamma_t = 2 / (t + 2)          ("2/(t+2)", the classic open-loop step; or a constant in (0, 1])
    rho_t   = 4 / (t + 8)^(2/3)    ("4/(t+8)^(2/3)"; or a constant in (0, 1])
rho_t is the averaging rate of the stochastic conditional gradient method of Mokhtari, Hassani
& Karbasi (2018), which the averaged-forward-gradient analysis builds on: rho_0 = 1 (the average
starts at the first estimate), rho_t -> 0 so the noise averages out, and rho_t decays more slowly
than gamma_t (gamma_t / rho_t -> 0) so the average forgets gradients taken at stale iterates. We
did not confirm from the paper itself that it uses these exact constants.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from forwardgrad.errors import ConfigurationError
from forwardgrad.optim.constraints import Constraint, parse_constraint

__all__ = ["FrankWolfe", "averaging_rate", "check_schedule", "open_loop_step_size"]

OPEN_LOOP = "2/(t+2)"
DECAYING_AVERAGE = "4/(t+8)^(2/3)"


def open_loop_step_size(t: int) -> float:
    """gamma_t = 2 / (t + 2): Frank-Wolfe's open-loop step size (gamma_0 = 1)."""
    return 2.0 / (t + 2)


def averaging_rate(t: int) -> float:
    """rho_t = 4 / (t + 8)^(2/3), capped at 1 (rho_0 = 1): the weight of the newest estimate."""
    return min(1.0, 4.0 / (t + 8) ** (2.0 / 3.0))


def _schedule_value(schedule: str | float, named: str, rule, t: int) -> float:
    return rule(t) if schedule == named else float(schedule)


def check_schedule(what: str, schedule: Any, named: str = OPEN_LOOP) -> None:
    """Raise ``ConfigurationError`` unless ``schedule`` is the named one or a constant in (0, 1]."""
    if isinstance(schedule, str):
        if schedule != named:
            raise ConfigurationError(
                f"FrankWolfe {what}={schedule!r} is not a known schedule; pass {named!r} or a "
                f"constant number in (0, 1]."
            )
        return
    is_number = isinstance(schedule, (int, float)) and not isinstance(schedule, bool)
    if not is_number or not 0 < schedule <= 1:
        raise ConfigurationError(
            f"FrankWolfe {what} must be {named!r} or a constant in (0, 1], got {schedule!r}; "
            f"a step outside (0, 1] would leave the constraint set."
        )


class FrankWolfe(torch.optim.Optimizer):
    """Frank-Wolfe optimizer over per-parameter convex constraints, driven by `.grad`.

    Each parameter of a group is constrained on its own to the group's set (the feasible region
    is the product of one copy of the set per parameter). Frank-Wolfe needs a feasible start:
    with `project_start=True` (default) a parameter outside its set is moved, when it is added, to
    its Euclidean projection onto the set (in place, once); with `project_start=False` that raises.

    After each `step()`, `last_gap` holds the Frank-Wolfe gap sum_x <d, x - s> summed over all
    parameters, and `last_group_gaps` one sum per group, both measured with the direction d the
    step used (the average when averaging, else the raw estimate), before the update;
    `last_group_step_sizes` holds the gamma_t each group used (what a log's "lr" column wants).

    Args:
        params: parameters or parameter groups (dicts may override constraint, lr, averaging, rho).
        constraint: a Constraint or its string form such as "l1:5" (see optim.constraints).
        lr: step size gamma_t: "2/(t+2)" (default) or a constant in (0, 1].
        averaging: average the estimates, d_t = (1 - rho_t) d_{t-1} + rho_t g_t; False uses g_t.
        rho: averaging rate: "4/(t+8)^(2/3)" (default) or a constant in (0, 1].
        project_start: move infeasible parameters onto their set (True) or raise (False).

    `lr` may be a string, so learning-rate schedulers do not apply; pass a constant to control it.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        constraint: Constraint | str | None = None,
        lr: str | float = OPEN_LOOP,
        averaging: bool = True,
        rho: str | float = DECAYING_AVERAGE,
        project_start: bool = True,
    ):
        self._project_start = project_start
        defaults = dict(constraint=constraint, lr=lr, averaging=averaging, rho=rho)
        super().__init__(params, defaults)
        self.last_gap: float | None = None
        self.last_group_gaps: list[float] = []
        self.last_group_step_sizes: list[float | None] = []  # None: no grad in the group

    def add_param_group(self, param_group: dict) -> None:
        group = {**self.defaults, **param_group}
        if group["constraint"] is None:
            raise ConfigurationError(
                "FrankWolfe needs a constraint set: pass constraint='l1:5' (or a Constraint) "
                "to FrankWolfe, or a 'constraint' key in every parameter group."
            )
        constraint = parse_constraint(group["constraint"])
        check_schedule("lr", group["lr"], OPEN_LOOP)
        check_schedule("rho", group["rho"], DECAYING_AVERAGE)
        super().add_param_group({**param_group, "constraint": constraint})
        group_index = len(self.param_groups) - 1
        for index, param in enumerate(self.param_groups[-1]["params"]):
            self._make_feasible(param, constraint, f"parameter {index} of group {group_index}")

    def _make_feasible(self, param: Tensor, constraint: Constraint, where: str) -> None:
        constraint.check_param(param)
        with torch.no_grad():
            if constraint.contains(param):
                return
            if not self._project_start:
                raise ValueError(
                    f"{where} (shape {tuple(param.shape)}) lies outside the constraint set "
                    f"{constraint}, and Frank-Wolfe needs a feasible start; initialise it inside "
                    f"the set or pass project_start=True to move it onto the set."
                )
            param.copy_(constraint.project_start(param))

    @torch.no_grad()
    def step(self, closure=None):
        """One Frank-Wolfe step for every parameter that has a `.grad`.

        Args:
            closure: optional; re-evaluates the model and returns the loss (as in torch.optim).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group_gaps, step_sizes = [], []
        for group in self.param_groups:
            # Checked again here: a training loop may have overwritten group["lr"] since.
            check_schedule("lr", group["lr"], OPEN_LOOP)
            gap, gamma = torch.zeros(()), None
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise ValueError("FrankWolfe does not support sparse gradients.")
                t = self.state[param].get("step", 0)
                gamma = _schedule_value(group["lr"], OPEN_LOOP, open_loop_step_size, t)
                gap = gap + self._update(param, group, t, gamma).cpu()
            group_gaps.append(float(gap))
            step_sizes.append(gamma)
        self.last_group_gaps = group_gaps
        self.last_group_step_sizes = step_sizes
        self.last_gap = sum(group_gaps)
        return loss

    def _update(self, param: Tensor, group: dict, t: int, gamma: float) -> Tensor:
        """Average the estimate, call the LMO, move towards the vertex; return the gap."""
        state = self.state[param]
        direction = param.grad
        if group["averaging"]:
            rho = _schedule_value(group["rho"], DECAYING_AVERAGE, averaging_rate, t)
            if "average" not in state:
                state["average"] = param.grad.detach().clone()  # d_0 = g_0
            else:
                state["average"].lerp_(param.grad, rho)  # d + rho (g - d)
            direction = state["average"]
        vertex = group["constraint"].lmo(direction)
        gap = torch.sum(direction * (param - vertex))
        param.lerp_(vertex, gamma)  # x + gamma (s - x)
        state["step"] = t + 1
        return gap.detach()

    def state_dict(self) -> dict:
        """torch.optim state, with each constraint stored as its string form.

        Strings keep the checkpoint loadable with torch.load(weights_only=True).
        """
        saved = super().state_dict()
        for group in saved["param_groups"]:
            group["constraint"] = str(group["constraint"])
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore steps and averages; a saved constraint string replaces the group's set.

        If the saved string equals str() of the constraint the optimizer was built with, that object
        is kept (it may carry settings the string omits, such as power-iteration counts).
        """
        current = [group["constraint"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, mine in zip(self.param_groups, current, strict=True):
            saved = group["constraint"]
            group["constraint"] = mine if str(mine) == str(saved) else parse_constraint(saved)
