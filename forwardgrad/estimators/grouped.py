"""Forward gradients for a model with local losses: each group's parameters take their own
group's directional derivatives.

With a closure that returns one loss per group (``LocalLosses.losses``: blocks with detached
inputs and their heads) and tangents v_k over every parameter, one evaluation gives

    d_{k,g} = ∇L_g · v_k = ∇_{θ_g} L_g · v_{k,g}        (L_g depends on θ_g alone),

and group g's parameters get the forward gradient of their own loss, Σ_k c_{k,g} v_{k,g} with
c_{·,g} from d_{·,g} by the estimator's combiner (mean: d/K; projection: over θ_g's tangents
and n_g = |θ_g|). Using Σ_g d_g instead would also be unbiased for ∇ Σ_g L_g (E[v_g v_hᵀ] = 0),
but every block would then carry the other blocks' noise; using d_g, the variance scales with
the size of group g, not of the whole model (Ren et al., ICLR 2023).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from forwardgrad import tangents as tg
from forwardgrad.estimators.base import check_finite, write_grads
from forwardgrad.estimators.tables import LossTable, objective
from forwardgrad.jvp import directional_derivatives


def grouped_estimate(
    estimator,
    model: nn.Module,
    closure: Callable[[], torch.Tensor],
    source: tg.TangentSource,
    group_of: list[int],
    groups: int,
) -> torch.Tensor:
    """Fill ``.grad`` of ``source.params`` group by group and return L = Σ_g L_g.

    ``estimator`` is a ``ForwardGradient`` (its combiner, path flags and reducer are used);
    ``group_of[i]`` is parameter i's group. A scalar closure gives no per-group derivatives:
    every parameter then takes the one derivative of the scalar, as without groups.
    """
    table = LossTable(closure, groups, per_example=False)
    result = directional_derivatives(model, table, source, vector=True, fast=estimator.fast)
    estimator.last_path, estimator.last_fallback = result.path, result.fallback
    count, rows = source.count, table.rows
    values = objective(result.value, rows)
    derivatives = result.derivatives.reshape(count, rows, -1).mean(2)  # of each batch mean
    local = torch.cat([values, derivatives.reshape(-1)])
    total = estimator.reduced(local, f"the all-reduce of the step's {local.numel()} numbers")
    loss, derivatives = total[:rows].sum(), total[rows:].reshape(count, rows)
    check_finite(loss, derivatives)
    if rows == 1:
        source.write_grads(estimator.coefficients(derivatives[:, 0], source))
    else:
        coefficients = group_coefficients(estimator.combine, derivatives, source, group_of)
        write_group_grads(source, coefficients, group_of)
    return loss


def group_coefficients(
    combine: str, derivatives: torch.Tensor, source: tg.TangentSource, group_of: list[int]
) -> torch.Tensor:
    """c ``(K, G)``: group g's estimate is Σ_k c_{k,g} v_{k,g}."""
    count, groups = derivatives.shape
    if combine == "mean":
        return derivatives / count
    coefficients = torch.zeros(count, groups, dtype=torch.float64, device=derivatives.device)
    for g in range(groups):
        members = [i for i, h in enumerate(group_of) if h == g]
        if not members:
            continue
        gram = tg.gram_matrix([source(i) for i in members])
        size = sum(source.params[i].numel() for i in members)
        coefficients[:, g] = tg.projection_coefficients(derivatives[:, g], gram, size)
    return coefficients


def write_group_grads(
    source: tg.TangentSource, coefficients: torch.Tensor, group_of: list[int]
) -> None:
    """``.grad`` of parameter i ← Σ_k c_{k,g(i)} v_{k,i} (overwritten), through the source's
    ``accumulate`` (structured tangents keep their factors; K = 1 tangents drawn into
    ``.grad`` are read before it is written)."""
    for i, p in enumerate(source.params):
        estimate = torch.zeros_like(p, memory_format=torch.contiguous_format)
        source.accumulate(i, estimate, coefficients[:, group_of[i]].tolist())
        write_grads([p], [estimate])


__all__ = ["group_coefficients", "grouped_estimate", "write_group_grads"]
