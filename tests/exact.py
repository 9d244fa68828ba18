"""Exact per-example gradients at layer outputs, by autograd: the reference for activity
perturbation's estimates (shared by the activity and local-loss tests)."""

from __future__ import annotations

import torch


def output_gradients(table, modules):
    """``[∂ℓ_{g,n}/∂z^c_n]`` for every call c of ``modules`` (in call order), each of shape
    ``(G, B, *z_c.shape[1:])``, where ``table()`` returns the ``(G, B)`` (or ``(B,)``) losses.
    Rows of a batch must not interact (no BatchNorm in training mode)."""
    outputs = []

    def keep(module, args, output):
        outputs.append(output)

    handles = [m.register_forward_hook(keep) for m in modules]
    try:
        with torch.enable_grad():
            values = table()
    finally:
        for h in handles:
            h.remove()
    values = values.reshape(-1 if values.dim() == 2 else 1, values.shape[-1])
    rows, batch = values.shape
    found = [torch.zeros(rows, *z.shape, dtype=z.dtype) for z in outputs]
    for g in range(rows):
        for n in range(batch):
            grads = torch.autograd.grad(values[g, n], outputs, retain_graph=True, allow_unused=True)
            for c, grad in enumerate(grads):
                if grad is not None:
                    found[c][g, n] = grad[n]
    return found


def expected_output_gradients(exact, tangents, groups, alone=False):
    """ĝ^c = (1/KB) Σ_k d_{k,g(c),n} u^c_{k,n}, with d the exact per-example derivatives along
    every call's tangents (``alone``: along call c's own tangents only, as with layerwise
    tangent slots); ``groups[c]`` is call c's row, or None for the sum over rows."""
    count, batch = tangents[0].shape[:2]
    own = [torch.einsum("gn...,kn...->kgn", e, u) for e, u in zip(exact, tangents)]
    found = []
    for c, (u, group) in enumerate(zip(tangents, groups)):
        d = own[c] if alone else sum(own)
        coefficients = d[:, group] if group is not None else d.sum(1)
        found.append(torch.einsum("kn,kn...->n...", coefficients / (count * batch), u))
    return found
