"""PyTorch's own forward-mode formulas, one call at a time: how the stacked evaluation covers
every operation without a rule."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._pytree import tree_flatten, tree_unflatten


def forward_ad_call(mode, func, args, kwargs):
    """Run ``func`` on dual tensors, once per tangent, and stack its outputs' tangents.

    ``mode`` is the ``StackedTangents`` evaluation: the inputs' tangents come from it and the
    outputs' go to it.

    The primal comes from the first pass; before each further pass the RNG states are put back,
    so a random function draws the same numbers for every tangent. Raises the error PyTorch
    raises when the function has no forward-mode formula.
    """
    name = getattr(func, "__name__", str(func))
    mode.forward_ad_calls[name] = mode.forward_ad_calls.get(name, 0) + 1
    flat, spec = tree_flatten((args, kwargs))
    positions = [i for i, a in enumerate(flat) if mode.carries(a)]
    tangents = [mode.tangent(flat[i]) for i in positions]
    rng = _rng_state() if mode.count > 1 else None
    primal_outputs, output_tangents = None, []
    for k in range(mode.count):
        if k > 0:
            _set_rng_state(rng)
        with fwAD.dual_level():
            duals = list(flat)
            for i, t in zip(positions, tangents):
                duals[i] = _dual(flat[i], t[k])
            dual_args, dual_kwargs = tree_unflatten(duals, spec)
            outputs, out_spec = tree_flatten(func(*dual_args, **dual_kwargs))
            output_tangents.append([_tangent_of(o) for o in outputs])
        if primal_outputs is None:  # plain tensors now that their level has closed
            primal_outputs = outputs
    for j, out in enumerate(primal_outputs):
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            parts = [ts[j] for ts in output_tangents]
            if any(p is not None for p in parts):
                parts = [torch.zeros_like(out) if p is None else p for p in parts]
                mode.track(out, torch.stack(parts), fresh=True)
            else:
                mode.track(out, None)
    return tree_unflatten(primal_outputs, out_spec)


def _dual(x: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    if tangent.shape != x.shape:
        tangent = tangent.expand(x.shape)
    if tangent.dtype != x.dtype:
        tangent = tangent.to(x.dtype)
    return fwAD.make_dual(x, tangent)


def _tangent_of(value) -> torch.Tensor | None:
    return fwAD.unpack_dual(value).tangent if isinstance(value, torch.Tensor) else None


def _rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
