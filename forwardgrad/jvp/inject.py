"""Tangents injected inside the closure: the engine's hook for perturbing activations.

During an evaluation by the derivative engine, ``add_tangent(z, u)`` returns ``z`` carrying the
tangent ż + u instead of ż (``u`` of shape ``(K, *z.shape)``, one slice per tangent): every
directional derivative of the closure's value then also moves along u at z,

    d_k = ∇_θ L · v_k + ∇_z L · u_k,

with v_k the source's parameter tangents (none, for activity perturbation: Ren et al.,
*Scaling Forward Gradient with Local Losses*, ICLR 2023). It works on both paths:

- fast path (``jvp.stacked``): u is added to the ``(K, *shape)`` tangent the stacked evaluation
  keeps for z; the same tensor z comes back;
- general path (``jvp.general``, evaluation k of K): a new dual tensor with primal z and tangent
  ż + u[k] comes back.

So the caller must use the returned tensor in place of z (a forward hook returns it as the
module's output). Outside an evaluation by the engine there is no tangent to add to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Protocol

import torch

from forwardgrad.errors import EstimatorError


class Injector(Protocol):
    """What each path provides: its K and how it adds a tangent to a tensor."""

    count: int

    def add_tangent(self, value: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor: ...


_ACTIVE: ContextVar[Injector | None] = ContextVar("forwardgrad_injector", default=None)


@contextlib.contextmanager
def evaluating(injector: Injector) -> Iterator[None]:
    """Make ``injector`` the one ``add_tangent`` uses while the closure runs (the paths call
    this around each evaluation)."""
    token = _ACTIVE.set(injector)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def tangent_count() -> int | None:
    """K of the evaluation running now, or ``None`` outside an evaluation by the engine."""
    injector = _ACTIVE.get()
    return None if injector is None else injector.count


def add_tangent(value: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """``value`` with ``tangent`` (shape ``(K, *value.shape)``) added to its tangent.

    Use the returned tensor in place of ``value`` (see the module docstring).

    Raises:
        EstimatorError: called outside an evaluation by the derivative engine, or ``tangent``
            has the wrong shape.
    """
    injector = _ACTIVE.get()
    if injector is None:
        raise EstimatorError(
            "add_tangent was called outside an evaluation by the derivative engine; call it "
            "inside the closure given to forwardgrad.jvp.directional_derivatives."
        )
    expected = (injector.count, *value.shape)
    if tuple(tangent.shape) != expected:
        raise EstimatorError(
            f"the injected tangent has shape {tuple(tangent.shape)}; it must be (K, *value.shape)"
            f" = {expected}."
        )
    return injector.add_tangent(value, tangent.to(dtype=value.dtype))


__all__ = ["Injector", "add_tangent", "evaluating", "tangent_count"]
