"""Shared by the derivative tests: the fast path against the general path on the same tangents."""

from __future__ import annotations

import torch

import forwardgrad as fg
from forwardgrad import tangents as tg


def assert_same_derivatives(model, closure, count, distribution="normal", atol=1e-5, rank=None):
    """The fast path runs (and passes its first-use check) and gives the general path's loss,
    derivatives and buffers for the same tangents (structured ones with ``rank``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    source = tg.HeldTangents(params, count, distribution, seed=21, rank=rank)
    fast = fg.directional_derivatives(model, closure, source)
    assert fast.path == "fast", fast.fallback
    fast_buffers = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(buffers)
    torch.set_rng_state(rng)
    general = fg.directional_derivatives(model, closure, source, fast=False)
    assert general.path == "general"
    assert torch.allclose(fast.value, general.value, rtol=1e-6, atol=1e-7)
    scale = general.derivatives.abs().max().clamp_min(1.0).item()
    assert torch.allclose(fast.derivatives, general.derivatives, rtol=0, atol=atol * scale)
    for name, value in model.state_dict().items():  # BatchNorm statistics updated once
        assert torch.allclose(fast_buffers[name].float(), value.float(), atol=1e-6), name
    return fast, general
