"""Tables of losses: closures that return one loss per example, per block, or both.

Activity perturbation needs each example's own loss, and local losses give one loss per block,
so a closure may return, instead of a scalar,

- a vector ``(B,)`` of per-example losses (``F.cross_entropy(..., reduction="none")``), or
- a table ``(G, B)``: G groups (blocks with their own loss) by B examples, or ``(G,)`` one
  loss per group, already averaged over the batch.

The objective such a closure stands for is the sum over groups of the batch mean,

    L = Σ_g (1/B) Σ_n ℓ_{g,n},

so a ``(B,)`` vector stands for the usual mean loss and a ``LocalLosses`` table for the sum of
the blocks' local losses. ``LossTable`` wraps such a closure for the derivative engine, which
takes vectors: it checks the shape, remembers it and hands the engine the flattened table.

A model whose losses come in groups says which parameters each group trains with
``loss_groups()`` (``LossGroup``s, see ``LocalLosses``); ``group_of_parameters`` reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from forwardgrad.errors import ConfigurationError
from forwardgrad.jvp.checks import as_tensor


@dataclass(frozen=True)
class LossGroup:
    """The parameters one local loss trains: its block's (``body``) and its auxiliary head's
    (``head``, empty for the last block, whose loss is the model's own)."""

    body: tuple[nn.Parameter, ...]
    head: tuple[nn.Parameter, ...]

    @property
    def params(self) -> tuple[nn.Parameter, ...]:
        return self.body + self.head


def loss_groups(model: nn.Module) -> list[LossGroup] | None:
    """The model's ``loss_groups()``, or ``None`` for a model with one loss."""
    declare = getattr(model, "loss_groups", None)
    return None if declare is None else list(declare())


def group_of_parameters(
    model: nn.Module, params: Sequence[torch.Tensor]
) -> tuple[list[int], int] | None:
    """``(group index of each of params, G)`` for a model with loss groups, else ``None``.

    Raises:
        ConfigurationError: a trainable parameter belongs to no group.
    """
    groups = loss_groups(model)
    if groups is None:
        return None
    index = {id(p): g for g, group in enumerate(groups) for p in group.params}
    if any(id(p) not in index for p in params):
        names = {id(p): name for name, p in model.named_parameters()}
        missing = [names.get(id(p), "?") for p in params if id(p) not in index]
        raise ConfigurationError(
            f"{type(model).__name__} declares loss groups, but the trainable parameter(s) "
            f"{', '.join(missing)} belong to none of them; add them to a block or freeze them."
        )
    return [index[id(p)] for p in params], len(groups)


class LossTable:
    """The closure's table of losses, flattened for the engine (see the module docstring).

    Args:
        closure: returns a scalar, ``(B,)``, ``(G,)`` or ``(G, B)`` (as allowed below).
        groups: G, the number of loss groups the model declares, or ``None``.
        per_example: the caller needs one loss per example (activity perturbation): a scalar
            or a table without an example dimension is refused.
        before: called before each run of the closure (the engine may run it more than once).

    Attributes:
        rows: the number of rows (groups) of the latest value; 1 for a scalar or ``(B,)``.
        scalar: the latest value was a scalar.
    """

    def __init__(
        self,
        closure: Callable[[], torch.Tensor],
        groups: int | None,
        per_example: bool,
        before: Callable[[], None] | None = None,
    ) -> None:
        self.closure, self.groups, self.per_example = closure, groups, per_example
        self.before = before
        self.rows, self.scalar = 1, False

    def __call__(self) -> torch.Tensor:
        if self.before is not None:
            self.before()
        value = as_tensor(self.closure())
        self.rows, self.scalar = self._rows(tuple(value.shape)), value.dim() == 0
        return value.reshape(-1)

    def _rows(self, shape: tuple[int, ...]) -> int:
        g = self.groups
        if not self.per_example and (len(shape) == 0 or shape == (1,)):
            return 1
        if g is None and len(shape) == 1:
            return 1  # (B,): one loss per example
        if len(shape) == 2 and (g is None or shape[0] == g):
            return shape[0]
        if g is not None and not self.per_example and shape == (g,):
            return g
        raise ConfigurationError(self._expected(shape))

    def _expected(self, shape: tuple[int, ...]) -> str:
        g = self.groups
        if self.per_example:
            wanted = "one loss per example, shape (B,) (reduction='none')"
            if g is not None:
                wanted = f"a ({g}, B) table of per-example losses, one row per loss group"
            if not shape:
                wanted += "; a scalar loss has no per-example derivatives to perturb with"
        else:
            wanted = f"a scalar, ({g},) or ({g}, B): one row per loss group"
        return f"the closure returned a tensor of shape {shape}; expected {wanted}."


def objective(values: torch.Tensor, rows: int) -> torch.Tensor:
    """Each group's batch mean, ``(rows,)``, of a flattened table (its sum is L)."""
    return values.reshape(rows, -1).mean(1)


__all__ = ["LossGroup", "LossTable", "group_of_parameters", "loss_groups", "objective"]
