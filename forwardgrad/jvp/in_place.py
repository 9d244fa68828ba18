"""In-place spellings: the out-of-place call that computes what an in-place one writes.

``x.clamp_(0)``, ``x += y``, ``F.relu(x, inplace=True)``, ``x.copy_(y)``: the stacked evaluation
runs the out-of-place form (through its rule or PyTorch's formula) and writes the value and its
tangent back into ``x`` (``StackedTangents.assign``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

from forwardgrad.jvp.rules import IN_PLACE


def out_of_place(func, args, kwargs):
    """``(plain, args, kwargs)``: the out-of-place call that computes what ``func`` writes into
    ``args[0]``, or None when ``func`` is not an in-place operation."""
    if kwargs.get("inplace") is True or _inplace_flag(func, args):
        plain_kwargs = dict(kwargs, inplace=False)
        return func, _without_inplace_flag(func, args), plain_kwargs
    if kwargs.get("out") is not None:
        raise NotImplementedError(f"{getattr(func, '__name__', func)} with out=")
    plain = IN_PLACE.get(func)
    if plain is None:
        plain = _plain_form(func)
    if plain is None:
        return None
    return plain, args, kwargs


@functools.cache
def _inplace_position(func) -> int | None:
    try:
        parameters = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None
    return parameters.index("inplace") if "inplace" in parameters else None


def _inplace_flag(func, args) -> bool:
    position = _inplace_position(func)
    return position is not None and len(args) > position and args[position] is True


def _without_inplace_flag(func, args):
    position = _inplace_position(func)
    if position is None or len(args) <= position:
        return args
    return (*args[:position], False, *args[position + 1 :])


@functools.cache
def _plain_form(func) -> Callable | None:
    """``Tensor.clamp_`` -> ``Tensor.clamp``, ``Tensor.__iand__`` -> ``Tensor.__and__``."""
    name = getattr(func, "__name__", "")
    owner = torch.Tensor if getattr(torch.Tensor, name, None) is func else None
    if owner is None:
        owner = torch if getattr(torch, name, None) is func else None
    if owner is None or not name:
        return None
    if name.startswith("__i") and name.endswith("__"):
        return getattr(owner, f"__{name[3:]}", None)
    if name.endswith("_") and not name.endswith("__"):
        if name in ("copy_", "zero_", "fill_", "requires_grad_", "detach_"):
            return _SPECIAL_PLAIN.get(name)
        return getattr(owner, name[:-1], None)
    return None


def _copy(x, source, non_blocking=False):
    return source.to(dtype=x.dtype, device=x.device).expand_as(x).clone()


def _zero(x):
    return torch.zeros_like(x)


def _fill(x, value):
    if isinstance(value, torch.Tensor):
        return value.to(x.dtype).expand_as(x).clone()
    return torch.full_like(x, value)


_SPECIAL_PLAIN = {"copy_": _copy, "zero_": _zero, "fill_": _fill}
