"""The derivative engine: the one call every forward-mode estimator makes.

``directional_derivatives(model, closure, source)`` evaluates the closure once and returns its
value with the K directional derivatives d_k = ∇value·v_k along the source's tangents, by

- the *fast path* (``jvp.stacked``): one evaluation with the K tangents stacked beside every
  activation, rules where they pay and PyTorch's forward-mode formulas elsewhere; or
- the *general path* (``jvp.general``): PyTorch's dual tensors, one evaluation per tangent,

and says which one ran. The fast path is checked against the general path the first time a
model is used in each setting (train or eval mode, K = 1 or more, a scalar or a vector value),
and every rule it runs is checked alone in float64 on a slice of its inputs (``rule_check``); a
model the fast path cannot run
or that fails the check takes the general path from then on, with the reason reported once
through ``warnings`` and kept in ``Directional.fallback``.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from forwardgrad.errors import EstimatorError, UnsupportedOperation
from forwardgrad.jvp import checks
from forwardgrad.jvp.general import BLOCK_VALUES, general_derivatives, locate_failure
from forwardgrad.jvp.replay import Replay
from forwardgrad.jvp.routes import forward_mode_context
from forwardgrad.jvp.stacked import TangentReused, Unsupported, stacked_derivatives
from forwardgrad.tangents.sources import TangentSource

FAST, GENERAL = "fast", "general"
# The first-use check compares this many tangents with the general path, which evaluates the
# closure once per tangent: enough to catch what the fast path cannot see, at a bounded cost.
CHECKED_TANGENTS = 2


class FallbackWarning(UserWarning):
    """A model left the fast path for the general one (reported once per model)."""


@dataclass(frozen=True)
class Directional:
    """What one evaluation gives.

    Attributes:
        value: the closure's value, detached: a scalar loss, or a vector of m losses.
        derivatives: d_k = ∇value·v_k, shape ``(K,)`` for a scalar, ``(K, m)`` for a vector.
        path: ``"fast"`` or ``"general"``.
        fallback: ``None`` on the fast path; else one sentence on why the general path ran.
    """

    value: torch.Tensor
    derivatives: torch.Tensor
    path: str
    fallback: str | None


@dataclass
class _ModelState:
    general: str | None = None  # why this model takes the general path for good
    verified: set = field(default_factory=set)  # settings whose fast path was checked
    keeps_relu_inputs: bool = False  # relu must not write over its input's tangent


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_path(model: nn.Module) -> tuple[str, str | None]:
    """``(path, reason)`` this model takes now: ``("fast", None)`` or ``("general", reason)``."""
    state = _STATES.get(model)
    if state is None or state.general is None:
        return FAST, None
    return GENERAL, state.general


def directional_derivatives(
    model: nn.Module,
    closure: Callable[[], torch.Tensor],
    source: TangentSource,
    *,
    vector: bool = False,
    fast: bool = True,
) -> Directional:
    """The closure's value and its K directional derivatives along ``source``'s tangents.

    Args:
        model: the module whose parameters (``source.params``) the closure uses.
        closure: computes the loss with ``model``; it must not call ``backward()``. It may run
            more than once (the first use of each setting, a fallback); buffers and RNG states
            are rewound so that every run counts as one forward.
        source: the tangents (see ``forwardgrad.tangents.sources``).
        vector: the closure returns a vector of m losses (per example, per block) instead of a
            scalar; the derivatives are then ``(K, m)``.
        fast: try the fast path (False: the general path only).

    Raises:
        UnsupportedOperation: the closure uses an operation without a forward-mode derivative.
        TypeError, ValueError: the closure returned something other than a loss of that shape.
    """
    state = _STATES.get(model)
    if state is None:
        state = _STATES[model] = _ModelState()
    closure = checks.guarded(closure)
    replay = Replay(model)
    with forward_mode_context():
        stopped = None  # what stopped the fast path, if it stopped
        if fast and state.general is None:
            try:
                return _fast(model, closure, source, state, replay, vector)
            except Unsupported as error:
                stopped = error
            except Exception:  # the closure's own error: the general path runs it and reports
                pass
            _reset(source, replay)
        value, tangent = _general(model, closure, source, replay)
        value = checks.check_value(value, vector)
        if stopped is not None:  # the closure is fine: the fast path cannot follow it
            _leave_fast_path(model, state, _reason(model, closure, source, stopped))
    derivatives = _derivatives(value, tangent, source.count)
    return Directional(value, derivatives, GENERAL, state.general if fast else None)


def _fast(model, closure, source, state, replay, vector) -> Directional:
    rank = getattr(source, "rank", None)  # structured tangents run other rules' branches
    key = (model.training, source.count == 1, type(source).__name__, vector, rank)
    first = key not in state.verified
    value, tangent = _stacked(model, closure, source, state, replay, check_rules=first)
    value = checks.check_value(value, vector)
    derivatives = _derivatives(value, tangent, source.count)
    if first and bool(torch.isfinite(derivatives).all()):
        count = min(source.count, CHECKED_TANGENTS)
        reference = _reference(model, closure, source, replay, count)
        checked = reference is not None and bool(torch.isfinite(reference).all())
        if checked:  # (non-finite numbers say nothing either way)
            state.verified.add(key)
        if checked and not checks.agree(derivatives[:count], reference):
            _leave_fast_path(model, state, checks.disagreement(derivatives[:count], reference))
            if count < source.count:  # the general path's numbers for every tangent
                replay.rewind()
                value, tangent = general_derivatives(closure, source, replay)
                value = checks.check_value(value, vector)
                reference = _derivatives(value, tangent, source.count)
            return Directional(value, reference, GENERAL, state.general)
    return Directional(value, derivatives, FAST, None)


def _stacked(model, closure, source, state, replay, check_rules):
    buffers = list(model.buffers()) if check_rules else ()
    if not state.keeps_relu_inputs:
        try:
            value, tangent, _ = stacked_derivatives(closure, source, True, check_rules, buffers)
            return value, tangent
        except TangentReused:
            state.keeps_relu_inputs = True
            _reset(source, replay)
    value, tangent, _ = stacked_derivatives(closure, source, False, check_rules, buffers)
    return value, tangent


def _reference(model, closure, source, replay, count) -> torch.Tensor | None:
    """The general path's derivatives along the first ``count`` tangents, from the state the
    fast pass started in; the model is left as after the fast pass (one forward). Its linear
    layers run by blocks, so that the check does not raise the step's peak memory."""
    after = Replay(model)
    replay.rewind()
    try:
        value, tangent = general_derivatives(closure, source, replay, count, BLOCK_VALUES)
        reference = _derivatives(checks.as_tensor(value), tangent, count)
    except Exception:  # the general path cannot run this closure: trust the fast one
        reference = None
    finally:
        after.rewind()
    return reference


def _general(model, closure, source, replay):
    try:
        return general_derivatives(closure, source, replay)
    except RuntimeError as error:
        replay.rewind()
        where = locate_failure(model, lambda: general_derivatives(closure, source, replay))
        replay.rewind()
        friendly = checks.unsupported_operation(error, where)
        if friendly is None:
            raise
        raise friendly from None


def _derivatives(value: torch.Tensor, tangent: torch.Tensor | None, count: int) -> torch.Tensor:
    shape = (count,) if value.dim() == 0 else (count, value.numel())
    if tangent is None:  # the value does not depend on the parameters
        return value.new_zeros(shape)
    return tangent.reshape(shape)


def _reset(source: TangentSource, replay: Replay) -> None:
    replay.rewind()
    discard = getattr(source, "discard", None)
    if discard is not None:
        discard()


def _reason(model, closure, source, error: Unsupported) -> str:
    """One sentence: what sent the model to the general path, and in which module (found by
    running the fast path once more with module hooks; the model is left as it was)."""
    after = Replay(model)
    where = locate_failure(model, lambda: stacked_derivatives(closure, source, reuse=False))
    after.rewind()
    place = f" in module {where}" if where else ""
    return f"the fast path cannot follow {error}{place}; the general path runs instead"


def _leave_fast_path(model: nn.Module, state: _ModelState, reason: str) -> None:
    state.general = reason
    warnings.warn(f"{type(model).__name__}: {reason}.", FallbackWarning, stacklevel=4)


__all__ = [
    "Directional",
    "EstimatorError",
    "FallbackWarning",
    "UnsupportedOperation",
    "directional_derivatives",
    "model_path",
]
