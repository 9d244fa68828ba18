"""Local-guess forward gradients: Fournier, Rivaud, Belilovsky, Eickenberg & Oyallon, *Can
Forward Gradient Match Backpropagation?* (ICML 2023).

Instead of an isotropic random tangent, block l's direction is a *guess* of the global
gradient: the gradient of its local loss, v_l = ∇_{θ_l} L_l (L_l as in ``LocalLosses``: block
l's auxiliary head's loss on its detached input, so v_l comes from a backward pass through
block l and its head only, never through the network). A forward-mode evaluation of the
model's own loss L from block l's input onward (recorded during the local pass, with the RNG
states, so that Dropout draws the same masks) along v_l gives d_l = ∇_{θ_l} L · v_l, at the
cost of blocks l..G only; the last block needs none (d_G = ‖v_G‖², its guess being its exact
gradient). Block l's estimate is the projection of the true gradient onto its guess,

    g_l = (d_l / ‖v_l‖²) v_l = P_l ∇_{θ_l} L,     P_l = v_l v_lᵀ / ‖v_l‖².

**Bias, stated plainly.** Given the batch, g_l is deterministic, so it has no variance from
tangents, and it is *biased*: g_l − ∇_{θ_l} L = −(I − P_l) ∇_{θ_l} L, the whole component of the
true gradient orthogonal to the guess, of norm ‖∇_{θ_l} L‖ sin α_l (α_l the angle between the
local and the global gradient). It is always a descent direction for L (⟨g_l, ∇_{θ_l} L⟩ =
‖g_l‖² ≥ 0) but shorter by |cos α_l|, and zero where the local gradient is orthogonal to the
global one; it cannot move block l in any direction its local loss does not already favour.
The last block's guess is its exact gradient (its local loss is L), so g_G = ∇_{θ_G} L. The
heads are not part of L: each head takes its exact local gradient, v for its own loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from forwardgrad.errors import ConfigurationError
from forwardgrad.estimators.base import check_finite, trainable, write_grads
from forwardgrad.estimators.tables import LossTable, group_of_parameters, loss_groups, objective
from forwardgrad.jvp import directional_derivatives
from forwardgrad.jvp.checks import guarded
from forwardgrad.jvp.replay import Replay
from forwardgrad.tangents.sources import GivenTangents

GUESSES = ("local",)


def local_guess_estimate(
    estimator, model: nn.Module, closure: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """Fill ``.grad`` with local-guess estimates (see the module docstring); return L, the
    model's own loss end to end. ``closure`` returns ``model.losses(x, y)``."""
    groups = _check_model(estimator, model)
    params = trainable(model)
    group_of, count = group_of_parameters(model, params)
    heads = {id(p) for group in groups for p in group.head}
    replay = Replay(model)  # the guesses' forward and L's count as one forward
    staggered = hasattr(model, "recording_entries") and hasattr(model, "starting_at")
    with model.recording_entries() if staggered else contextlib.nullcontext() as entries:
        value, guesses = _local_gradients(closure, params, count)
    after = Replay(model)  # as after one forward: what the model is left as
    body = [i for i, p in enumerate(params) if id(p) not in heads]
    squared = torch.zeros(count, dtype=torch.float64)  # ‖v_l‖²
    for i in body:
        flat = guesses[i].reshape(-1)
        squared[group_of[i]] += float(flat @ flat)
    # A subclass whose ``losses`` records no entries (its own loop) takes the joint evaluation.
    staggered = staggered and len(entries) == count
    derive = _block_by_block if staggered else _jointly
    derivatives = derive(
        estimator, model, closure, replay, entries, [(i, params[i], guesses[i]) for i in body],
        group_of, squared,
    )  # fmt: skip
    after.rewind()
    check_finite(value, derivatives)
    scale = torch.where(squared > 0, derivatives.double().cpu() / squared, 0.0)
    for i, (p, g) in enumerate(zip(params, guesses)):
        if id(p) not in heads:
            g.mul_(float(scale[group_of[i]]))  # the guesses are this step's own tensors
    write_grads(params, guesses)
    return value


def _block_by_block(estimator, model, closure, replay, entries, body, group_of, squared):
    """d_l block by block, each from block l's recorded input: L evaluated from block l on,
    along v_l alone, costs the blocks after l only (all G at once would carry G tangents
    through every block, most of them zero). The last block's guess is its exact gradient,
    so d_G = ‖v_G‖² needs no evaluation. The full evaluation (l = 1) runs first, so that the
    first use of the fast path is checked on every operation."""
    count = len(squared)
    derivatives = torch.zeros(count, dtype=torch.float64)
    derivatives[count - 1] = squared[count - 1]
    for block in range(count - 1):
        members = [(p, g.unsqueeze(0)) for i, p, g in body if group_of[i] == block]
        if not members:
            continue
        replay.rewind()
        source = GivenTangents([p for p, _ in members], [g for _, g in members])
        start = model.starting_at(block, entries[block]) if block else contextlib.nullcontext()
        with model.end_to_end(), start:
            result = directional_derivatives(
                model, _model_loss(closure, count), source, fast=estimator.fast
            )
        estimator.last_path, estimator.last_fallback = result.path, result.fallback
        derivatives[block] = float(result.derivatives[0])
    return derivatives


def _jointly(estimator, model, closure, replay, entries, body, group_of, squared):
    """d_l for every block in one evaluation of L along G tangents, tangent l being v_l on
    block l and zero elsewhere: for models with loss groups that cannot start at a block."""
    count = len(squared)
    replay.rewind()
    source = _guess_tangents(
        [p for _, p, _ in body], [g for *_, g in body], [group_of[i] for i, *_ in body], count
    )
    with model.end_to_end():
        result = directional_derivatives(
            model, _model_loss(closure, count), source, fast=estimator.fast
        )
    estimator.last_path, estimator.last_fallback = result.path, result.fallback
    return result.derivatives.double().cpu()


def _guess_tangents(params, guesses, group_of, count: int) -> GivenTangents:
    """G tangents over the blocks' parameters: tangent l is v_l on block l, zero elsewhere."""
    tangents = []
    for p, guess, group in zip(params, guesses, group_of):
        tangent = guess.new_zeros((count, *p.shape))
        tangent[group] = guess
        tangents.append(tangent)
    return GivenTangents(params, tangents)


def _check_model(estimator, model: nn.Module):
    groups = loss_groups(model)
    if groups is None or not hasattr(model, "end_to_end"):
        raise ConfigurationError(
            f"guess='local' needs a model with local losses (forwardgrad.LocalLosses), got "
            f"{type(model).__name__}."
        )
    if estimator.reducer is not None:
        raise ConfigurationError(
            "guess='local' does not run data-parallel yet; use it on one process."
        )
    return groups


def _local_gradients(closure, params, count: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """L, the table's last row (the model's own loss: the last block's input is detached, its
    value is the same), and each parameter's gradient of its own group's loss, by a backward
    pass through its block and head only (the blocks' inputs are detached)."""
    table = LossTable(guarded(closure), count, per_example=False)
    with torch.enable_grad():
        values = table()
        _need_rows(table, count)
        total = objective(values, table.rows).sum()
        check_finite(total.detach())
        grads = torch.autograd.grad(total, params, allow_unused=True)
    value = objective(values.detach(), table.rows)[-1]
    return value, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _model_loss(closure, count: int) -> Callable[[], torch.Tensor]:
    """The closure's last row, the model's own loss once the blocks run end to end."""
    table = LossTable(closure, count, per_example=False)

    def loss():
        values = table()
        _need_rows(table, count)
        return objective(values, table.rows)[-1]

    return loss


def _need_rows(table: LossTable, count: int) -> None:
    if table.rows != count:
        raise ConfigurationError(
            f"guess='local' needs the table of local losses, {count} rows (return "
            "local.losses(x, y)), not a scalar."
        )


__all__ = ["GUESSES", "local_guess_estimate"]
