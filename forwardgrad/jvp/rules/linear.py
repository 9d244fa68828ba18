"""Rules for the operations that carry most of a network's arithmetic: linear maps, matrix
products, convolutions and embedding lookups.

Each of them is linear in each argument, so its tangent is the sum of the operation applied
with one argument replaced by its tangent. The K tangents of an activation are stacked as K·B
rows and go through one product; a weight's K tangents are drawn whole, or (``ForwardSGD``, a
large matrix) a block of rows at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forwardgrad.jvp.rules.registry import (
    Decline,
    add_terms,
    arg,
    batch_slices,
    lift,
    randn,
    rule,
    shaped,
)


def _linear_samples(dtype):
    x, w, b = randn(3, 4, dtype=dtype), randn(5, 4, dtype=dtype), randn(5, dtype=dtype)
    yield (x, w, b), {}
    yield (randn(2, 3, 4, dtype=dtype), w), {}
    yield (randn(4, dtype=dtype), w, b), {}


@rule("linear", samples=_linear_samples, owners=(torch, F))
def linear(mode, func, x, weight, bias=None):
    """y = x Wᵀ + b:  ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ.

    The weight's tangent comes whole, or a block of rows at a time from a source that draws a
    large matrix so (then each block fills its columns of ẏ in place)."""
    out = func(x, weight, bias)
    tx, tb = mode.tangent(x), mode.tangent(bias)
    blocks = mode.row_blocks(weight)
    if blocks is None:
        tw = mode.tangent(weight)
        blocks = None if tw is None else [(0, weight.shape[0], tw)]
    count = mode.count
    tangent = None  # kept of shape (K, *out.shape); the products work on views of it
    if tx is not None:
        tangent = F.linear(tx, weight)  # all K·B rows in one product
    if blocks is not None:  # x V_kᵀ into each block's output columns, in place
        rows = x.reshape(-1, x.shape[-1])
        beta = 1
        if tangent is None:
            tangent = torch.empty((count, *out.shape), dtype=out.dtype, device=out.device)
            beta = 0  # the blocks write every column once; addmm ignores the empty input
        stacked = tangent.view(count, rows.shape[0], weight.shape[0])
        for start, stop, v in blocks:
            columns = stacked[:, :, start:stop]
            if count == 1:
                columns[0].addmm_(rows, v[0].T, beta=beta)
            else:
                columns.baddbmm_(rows.expand(count, *rows.shape), v.transpose(1, 2), beta=beta)
    fresh = tangent is not None  # allocated here, not a view of the bias's tangent
    if tb is not None:
        bias_tangent = lift(tb, out.dim())
        tangent = bias_tangent if tangent is None else tangent.add_(bias_tangent)
    return mode.track(out, tangent, fresh=fresh)


def _addmm_samples(dtype):
    yield (randn(5, dtype=dtype), randn(3, 4, dtype=dtype), randn(4, 5, dtype=dtype)), {}
    yield (
        (randn(3, 5, dtype=dtype), randn(3, 4, dtype=dtype), randn(4, 5, dtype=dtype)),
        {
            "beta": 0.5,
            "alpha": 2.0,
        },
    )


@rule("addmm", samples=_addmm_samples)
def addmm(mode, func, c, a, b, *, beta=1, alpha=1):
    """y = β c + α a b:  ẏ = β ċ + α (ȧ b + a ḃ) (GPT-2's Conv1D is torch.addmm)."""
    out = func(c, a, b, beta=beta, alpha=alpha)
    tc, ta, tb = mode.tangent(c), mode.tangent(a), mode.tangent(b)
    tangent = None
    if ta is not None:
        tangent = torch.matmul(ta, b)  # (K, n, m): one product of K·n rows
    if tb is not None:
        term = torch.matmul(a, tb)
        tangent = term if tangent is None else tangent.add_(term)
    if tangent is not None and alpha != 1:
        tangent.mul_(alpha)
    fresh = tangent is not None
    if tc is not None:
        term = lift(tc, out.dim()) * beta if beta != 1 else lift(tc, out.dim())
        tangent = term if tangent is None else tangent.add_(term)
    return mode.track(out, tangent, fresh=fresh)


def _matmul_samples(dtype):
    yield (randn(3, 4, dtype=dtype), randn(4, 5, dtype=dtype)), {}
    yield (randn(2, 3, 4, dtype=dtype), randn(2, 4, 5, dtype=dtype)), {}
    yield (randn(2, 3, 4, dtype=dtype), randn(4, dtype=dtype)), {}
    yield (randn(4, 5, dtype=dtype), randn(3, 4, dtype=dtype)), {}  # for b.__rmatmul__(a)


@rule("matmul", "mm", "bmm", operator="matmul", reflected=True, samples=_matmul_samples)
def matmul(mode, func, a, b):
    """y = a b:  ẏ = ȧ b + a ḃ, vectorised over the K tangents."""
    out = func(a, b)
    ta, tb = mode.tangent(a), mode.tangent(b)
    tangent = None
    if ta is not None:
        tangent = torch.vmap(lambda t: torch.matmul(t, b))(ta)
    if tb is not None:
        tangent = add_terms(tangent, torch.vmap(lambda t: torch.matmul(a, t))(tb))
    return mode.track(out, tangent)


def _conv_samples(dtype):
    x, w = randn(2, 3, 6, 6, dtype=dtype), randn(4, 3, 3, 3, dtype=dtype)
    yield (x, w, randn(4, dtype=dtype)), {"padding": 1}
    yield (x, w), {"stride": 2}
    yield (randn(3, 6, 6, dtype=dtype), w, randn(4, dtype=dtype)), {}
    yield (randn(2, 4, 6, 6, dtype=dtype), randn(4, 1, 3, 3, dtype=dtype)), {"groups": 4}
    yield (randn(2, 4, 6, 6, dtype=dtype), randn(6, 2, 3, 3, dtype=dtype)), {"groups": 2}
    yield (randn(2, 3, 8, dtype=dtype), randn(4, 3, 3, dtype=dtype), randn(4, dtype=dtype)), {}
    yield (randn(2, 4, 8, dtype=dtype), randn(4, 1, 3, dtype=dtype)), {"groups": 4}
    yield (randn(1, 2, 4, 4, 4, dtype=dtype), randn(3, 2, 2, 2, 2, dtype=dtype)), {}


@rule("conv1d", "conv2d", "conv3d", samples=_conv_samples, owners=(torch, F))
def convolution(mode, func, x, weight, bias=None, *args, **kwargs):
    """y = x ⊛ W + b:  ẏ = ẋ ⊛ W + x ⊛ Ẇ + ḃ (K·B tangent images, K·C_out filters)."""
    out = func(x, weight, bias, *args, **kwargs)
    tx, tw, tb = mode.tangent(x), mode.tangent(weight), mode.tangent(bias)
    count, batched = mode.count, x.dim() == weight.dim()
    tangent = None
    slices = batch_slices(out, 2 * count) if batched else [slice(None)]
    if (tx is not None or tw is not None) and len(slices) == 1:
        tangent = _convolution_tangent(func, x, tx, weight, tw, count, args, kwargs)
    elif count == 1 and (tx is not None or tw is not None):
        # A slice of the batch at a time: whole, each product would leave one more
        # activation-sized temporary (two, when oneDNN reorders its output) at the peak.
        tangent = torch.empty((count, *out.shape), dtype=out.dtype, device=out.device)
        for rows in slices:
            part = None if tx is None else tx[:, rows]
            tangent[:, rows] = _convolution_tangent(
                func, x[rows], part, weight, tw, count, args, kwargs
            )
    elif tx is not None or tw is not None:
        # K > 1: the K·B tangent images in one convolution, and x ⊛ V_k, whose (B, K·C_out,
        # ...) result would be K activations more, a slice of the batch at a time.
        if tx is not None:
            tangent = _convolution_tangent(func, x, tx, weight, None, count, args, kwargs)
        if tw is not None:
            fresh = tangent is None
            if fresh:
                tangent = torch.empty((count, *out.shape), dtype=out.dtype, device=out.device)
            for rows in slices:
                stacked = _weight_tangent_images(func, x[rows], tw, args, kwargs)
                target = tangent[:, rows]
                target.copy_(stacked) if fresh else target.add_(stacked)
    if tb is not None:
        channel = 1 if batched else 0
        bias_tangent = tb.reshape(count, *([1] * channel), -1, *([1] * (out.dim() - channel - 1)))
        tangent = bias_tangent if tangent is None else tangent.add_(bias_tangent)
    return mode.track(out, tangent, fresh=tx is not None or tw is not None)


def _convolution_tangent(func, x, tx, weight, tw, count, args, kwargs) -> torch.Tensor:
    """ẋ_k ⊛ W + x ⊛ V_k for all k: one convolution of the K·B tangent images, and one of
    the images with the K weight tangents stacked as K·C_out filters."""
    batched = x.dim() == weight.dim()
    result = None
    if tx is not None:
        images = func(tx.flatten(0, 1) if batched else tx, weight, None, *args, **kwargs)
        result = shaped(images, (count, *([x.shape[0]] if batched else []), *images.shape[1:]))
    if tw is not None:
        stacked = _weight_tangent_images(func, x, tw, args, kwargs)
        result = stacked.contiguous() if result is None else result.add_(stacked)
    return result


def _weight_tangent_images(func, x, tw, args, kwargs) -> torch.Tensor:
    """x ⊛ V_k for all k, shape (K, B, C_out, ...): one convolution with the K weight tangents
    as K·C_out filters, ordered group by group so that each group's K copies see its inputs."""
    count, groups = tw.shape[0], arg(args, kwargs, 3, "groups", 1)
    batched = x.dim() == tw.dim() - 1
    per_group = tw.shape[1] // groups
    filters = tw.unflatten(1, (groups, per_group)).transpose(0, 1).flatten(0, 2)
    images = func(x, filters, None, *args, **kwargs)  # (B, groups·K·per_group, ...)
    channel = 1 if batched else 0
    images = images.unflatten(channel, (groups, count, per_group))
    images = images.movedim(channel + 1, 0)  # (K, [B], groups, per_group, ...)
    return images.flatten(channel + 1, channel + 2)


def _embedding_samples(dtype):
    indices = torch.tensor([[0, 2, 1], [3, 3, 0]])
    yield (indices, randn(5, 4, dtype=dtype)), {}
    yield (indices, randn(5, 4, dtype=dtype)), {"padding_idx": 3}
    yield (torch.tensor(2), randn(5, 4, dtype=dtype)), {}


@rule("embedding", samples=_embedding_samples, owners=(F,), constant=(0,))
def embedding(mode, func, indices, weight, padding_idx=None, max_norm=None, *args, **kwargs):
    """y = W[i]:  ẏ = Ẇ[i], the rows looked up in every tangent (by blocks for a large table)."""
    if max_norm is not None:  # it renormalises the rows it looks up, in place
        raise Decline("embedding with max_norm")
    if mode.carries(indices):
        raise Decline("embedding indices computed from parameters")
    out = func(indices, weight, padding_idx, max_norm, *args, **kwargs)
    blocks = mode.row_blocks(weight)
    if blocks is None:
        tw = mode.tangent(weight)
        tangent = tw[:, indices] if tw is not None else None
        # A 0-dim index selects a view of the table's tangent (.grad, for K = 1), not a copy.
        return mode.track(out, tangent, fresh=tw is not None and indices.dim() > 0)
    tangent = torch.empty((mode.count, *out.shape), dtype=out.dtype, device=out.device)
    for start, stop, v in blocks:  # the looked-up rows that fall in each block of the table
        inside = (indices >= start) & (indices < stop)
        tangent[:, inside] = v[:, indices[inside] - start]
    return mode.track(out, tangent, fresh=True)
