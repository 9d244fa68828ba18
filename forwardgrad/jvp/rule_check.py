"""The first-use check of each rule on the model's own inputs, in float64.

The first time a model runs on the fast path in a setting, every rule it uses is applied once
more to a small slice of the very inputs it just saw (the first rows of the batch), cast to
float64, and compared with PyTorch's own forward-mode formula on the same slice. A rule that is
off by more than 1e-7 of the tangent's scale (1e-5 for an operation that computes in
float32 whatever its inputs), say a GELU derivative off by 5e-4, sends the model
to the general path and says which rule. The slice keeps the check's memory small; the RNG
state is restored, so the step draws what it would have drawn without the check. A parameter
whose tangent is structured (``tangents.structured``) reaches the rule as its factors, and
PyTorch's formula gets the tangent they form.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from forwardgrad.tangents.sources import GivenTangents
from forwardgrad.tangents.structured import materialise

ROWS = 2  # rows of the batch the check keeps
# Of the tangent's scale: float64 results to 1e-7 (PyTorch's formulas use a few float32
# constants, hardsigmoid's 1/6), results an operation computes in float32 whatever its inputs
# (softmax(..., dtype=torch.float32)) to 1e-5. A rule off by 5e-4 fails either.
RTOL = {torch.float64: 1e-7}
RTOL_OTHER = 1e-5
MAX_BYTES = 16 * 2**20  # an input that cannot be sliced is checked whole up to this size


class RuleMismatch(Exception):
    """A rule disagrees with PyTorch's formula on the model's inputs (the message says which)."""


def signature(rule, args, kwargs) -> tuple:
    """What distinguishes one use of a rule from another for the check: the kinds of the
    arguments and the flags (batch norm with running statistics or with batch statistics)."""
    flat, _ = tree_flatten((args, kwargs))
    kinds = []
    for value in flat:
        if isinstance(value, torch.Tensor):
            kinds.append((value.dim(), value.is_floating_point()))
        elif isinstance(value, (bool, str, type(None))):
            kinds.append(value)
        else:
            kinds.append(type(value).__name__)
    return (rule.name, tuple(kinds), tuple(sorted(kwargs)))


def check_rule(mode, rule, func, args, kwargs) -> None:
    """Apply ``rule`` and PyTorch's formula to a float64 slice of ``args``; raise
    ``RuleMismatch`` if their tangents differ. Call it before the rule runs on the real inputs
    (the rule may overwrite an input's tangent)."""
    flat, spec = tree_flatten((args, kwargs))
    batch = _batch_size(mode, flat)
    for rows in (ROWS, None):  # a slice of the batch, else (small enough) the whole
        inputs = _inputs(mode, flat, batch, rows)
        if inputs is None:
            continue
        values, tangents, factors = inputs
        rng = torch.get_rng_state()
        try:
            got = _tangents_of(mode, rule, func, values, tangents, spec, factors)
            torch.set_rng_state(rng)
            expected = _tangents_of(mode, rule, func, values, tangents, spec, None)
        except Exception:  # this slice does not suit the operation (a reshape to the batch)
            continue
        finally:
            torch.set_rng_state(rng)
        _compare(rule, got, expected)
        return


def _batch_size(mode, flat) -> int | None:
    """Dim 0 of the first input that carries a tangent and is no parameter, else of the first
    that is no parameter (a first layer's input carries none, and is as large as any)."""
    inputs = [
        v for v in flat if isinstance(v, torch.Tensor) and v.dim() > 0 and not mode.is_parameter(v)
    ]
    for value in inputs:
        if mode.carries(value):
            return value.shape[0]
    return inputs[0].shape[0] if inputs else None


def _inputs(mode, flat, batch, rows):
    """float64 copies of the arguments (sliced to ``rows`` of the batch), their tangents and
    the first factors of the structured ones."""
    values, tangents, factors, total = [], {}, {}, 0
    for i, value in enumerate(flat):
        if not isinstance(value, torch.Tensor):
            values.append(value)
            continue
        sliced = rows is not None and batch is not None and value.dim() > 0
        sliced = sliced and value.shape[0] == batch and not mode.is_parameter(value)
        # A buffer is no row of the batch, even with as many entries: batch norm's kernel
        # would write all its running statistics into a cut copy (out of bounds).
        sliced = sliced and not mode.is_buffer(value)
        part = value[:rows] if sliced else value
        total += part.numel() * 8
        if (rows is None or batch is None) and total > MAX_BYTES:
            return None
        values.append(part.to(torch.float64) if part.is_floating_point() else part.clone())
        structured = mode.factors(value) if part.is_floating_point() else None
        if structured is not None:  # never the whole tangent of the step's own parameter
            a, b = (f[:1].to(torch.float64) for f in structured)
            factors[i] = (a, b)
            tangents[i] = materialise((a, b), value.shape)
            continue
        tangent = mode.tangent(value) if part.is_floating_point() else None
        if tangent is not None:
            first = tangent[:1]
            if first.shape[1:] != value.shape:
                first = first.expand(1, *value.shape)
            tangents[i] = (first[:, :rows] if sliced else first).to(torch.float64).clone()
    return values, tangents, factors


def _tangents_of(mode, rule, func, values, tangents, spec, factors):
    """The outputs' tangents by the rule (``factors``: given to it for those positions) or, with
    ``factors`` None, by PyTorch's formula."""
    from forwardgrad.jvp.forward_ad import forward_ad_call
    from forwardgrad.jvp.stacked import StackedTangents

    check = StackedTangents(GivenTangents([], [torch.zeros(1)]))
    inputs = [v.clone() if isinstance(v, torch.Tensor) else v for v in values]
    for i, tangent in tangents.items():
        check.track(inputs[i], tangent, fresh=True)
    for i, pair in (factors or {}).items():
        check.track_factors(inputs[i], pair)
    args, kwargs = tree_unflatten(inputs, spec)
    with torch.no_grad():  # rules run as from inside the mode's handler: the mode not active
        if factors is not None:
            out = rule.apply(check, func, *args, **kwargs)
        else:
            out = forward_ad_call(check, func, args, kwargs)
    outputs = tree_flatten(out)[0]
    return [check.tangent(o) for o in outputs if isinstance(o, torch.Tensor)]


def _compare(rule, got, expected) -> None:
    for a, b in zip(got, expected):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        scale = max(1.0, float(b.abs().max()) if b.numel() else 0.0)
        error = float((a - b).abs().max()) if b.numel() else 0.0
        if not error <= RTOL.get(b.dtype, RTOL_OTHER) * scale:
            raise RuleMismatch(
                f"the rule for {rule.name} is off by {error:.3g} (of {scale:.3g}) from "
                "PyTorch's forward-mode formula on this model's inputs"
            )
