"""Rules for the operations that carry most of a network's arithmetic: linear maps, matrix
products, convolutions and embedding lookups.

Each of them is linear in each argument, so its tangent is the sum of the operation applied
with one argument replaced by its tangent. The K tangents of an activation are stacked as K·B
rows and go through one product; a weight's K tangents are drawn whole, or (``ForwardSGD``, a
large matrix) a block of rows at a time, or come as the factors of structured tangents
(``rules.factored``), whose products are never formed whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forwardgrad.jvp.rules import factored
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


@rule("linear", samples=_linear_samples, owners=(torch, F), structured=(1,))
def linear(mode, func, x, weight, bias=None):
    """y = x Wᵀ + b:  ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ.

    The weight's tangent comes whole, a block of rows at a time from a source that draws a
    large matrix so (then each block fills its columns of ẏ in place), or as the factors of a
    structured tangent: x V_kᵀ = (x B_k) A_kᵀ."""
    out = func(x, weight, bias)
    tx, tb = mode.tangent(x), mode.tangent(bias)
    factors = mode.factors(weight)
    blocks = None if factors is not None else mode.row_blocks(weight)
    if blocks is None and factors is None:
        tw = mode.tangent(weight)
        blocks = None if tw is None else [(0, weight.shape[0], tw)]
    count = mode.count
    tangent = None  # kept of shape (K, *out.shape); the products work on views of it
    if tx is not None:
        tangent = F.linear(tx, weight)  # all K·B rows in one product
    if blocks is not None or factors is not None:  # x V_kᵀ into ẏ, in place
        rows = x.reshape(-1, x.shape[-1])
        beta = 1
        if tangent is None:
            tangent = torch.empty((count, *out.shape), dtype=out.dtype, device=out.device)
            beta = 0  # the blocks write every column once; addmm ignores the empty input
        stacked = tangent.view(count, rows.shape[0], weight.shape[0])
        if factors is not None:
            factored.add_rows_times(stacked, rows, factors, beta)
        for start, stop, v in blocks or ():
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


@rule("addmm", samples=_addmm_samples, structured=(1, 2))
def addmm(mode, func, c, a, b, *, beta=1, alpha=1):
    """y = β c + α a b:  ẏ = β ċ + α (ȧ b + a ḃ) (GPT-2's Conv1D is torch.addmm).

    A structured tangent of the weight b (in × out) goes through its factors, a V_k =
    (a A_k) B_kᵀ, as does one of a: V_k b = A_k (B_kᵀ b)."""
    out = func(c, a, b, beta=beta, alpha=alpha)
    fa, fb = mode.factors(a), mode.factors(b)
    ta = None if fa is not None else mode.tangent(a)
    tb = None if fb is not None else mode.tangent(b)
    tc = mode.tangent(c)
    tangent = None
    if ta is not None:
        tangent = torch.matmul(ta, b)  # (K, n, m): one product of K·n rows
    tangent = _factored_terms(mode, out, tangent, a, fa, b, fb)
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


@rule(
    "matmul",
    "mm",
    "bmm",
    operator="matmul",
    reflected=True,
    samples=_matmul_samples,
    structured=(0, 1),
)
def matmul(mode, func, a, b):
    """y = a b:  ẏ = ȧ b + a ḃ, vectorised over the K tangents.

    A structured tangent of a matrix b goes through its factors, a V_k = (a A_k) B_kᵀ, as does
    one of a matrix a when b is a vector or a matrix: V_k b = A_k (B_kᵀ b)."""
    out = func(a, b)
    fa = mode.factors(a) if a.dim() == 2 and b.dim() <= 2 else None
    fb = mode.factors(b) if b.dim() == 2 else None
    ta = None if fa is not None else mode.tangent(a)
    tb = None if fb is not None else mode.tangent(b)
    tangent = None
    if ta is not None:
        tangent = torch.vmap(lambda t: torch.matmul(t, b))(ta)
    if tb is not None:
        tangent = add_terms(tangent, torch.vmap(lambda t: torch.matmul(a, t))(tb))
    if fa is not None or fb is not None:
        tangent = add_terms(tangent, _factored_terms(mode, out, None, a, fa, b, fb))
    return mode.track(out, tangent)


def _factored_terms(mode, out, tangent, a, fa, b, fb):
    """``tangent`` (or a new tensor) plus a V_k for factors ``fb`` of b and V_k b for factors
    ``fa`` of a, of shape (K, *out.shape); a is (..., p) for ``fb``, a matrix for ``fa``."""
    if fa is None and fb is None:
        return tangent
    beta = 1
    if tangent is None:
        tangent = torch.empty((mode.count, *out.shape), dtype=out.dtype, device=out.device)
        beta = 0  # every element is written by the first term
    if fb is not None:
        rows = a.reshape(-1, a.shape[-1])
        stacked = tangent.view(mode.count, rows.shape[0], b.shape[-1])
        factored.add_rows_times(stacked, rows, factored.transposed(fb), beta)
        beta = 1
    if fa is not None:
        columns = b.reshape(b.shape[0], -1)
        stacked = tangent.view(mode.count, a.shape[0], columns.shape[1])
        factored.add_times_columns(stacked, fa, columns, beta)
    return tangent


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
    # More input channels than kernel positions (a structured tangent's shifted sums)
    x, w = randn(2, 20, 7, 7, dtype=dtype), randn(4, 20, 3, 3, dtype=dtype)
    yield (x, w, randn(4, dtype=dtype)), {"stride": 2, "padding": 1}
    yield (x, w), {"padding": "same", "dilation": 2}
    yield (randn(2, 6, 9, dtype=dtype), randn(3, 6, 2, dtype=dtype), None, 2), {}


@rule("conv1d", "conv2d", "conv3d", samples=_conv_samples, owners=(torch, F), structured=(1,))
def convolution(mode, func, x, weight, bias=None, *args, **kwargs):
    """y = x ⊛ W + b:  ẏ = ẋ ⊛ W + x ⊛ Ẇ + ḃ (K·B tangent images, K·C_out filters, or K·r
    filters and an outer product for a structured tangent without groups)."""
    out = func(x, weight, bias, *args, **kwargs)
    images = _weight_images(mode, func, weight, args, kwargs)
    tx, tb = mode.tangent(x), mode.tangent(bias)
    count, batched = mode.count, x.dim() == weight.dim()
    tangent = None
    slices = batch_slices(out, 2 * count) if batched else [slice(None)]
    if (tx is not None or images is not None) and len(slices) == 1:
        tangent = _convolution_tangent(func, x, tx, weight, images, count, args, kwargs)
    elif count == 1 and (tx is not None or images is not None):
        # A slice of the batch at a time: whole, each product would leave one more
        # activation-sized temporary (two, when oneDNN reorders its output) at the peak.
        tangent = torch.empty((count, *out.shape), dtype=out.dtype, device=out.device)
        for rows in slices:
            part = None if tx is None else tx[:, rows]
            tangent[:, rows] = _convolution_tangent(
                func, x[rows], part, weight, images, count, args, kwargs
            )
    elif tx is not None or images is not None:
        # K > 1: the K·B tangent images in one convolution, and x ⊛ V_k, whose (B, K·C_out,
        # ...) result would be K activations more, a slice of the batch at a time.
        if tx is not None:
            tangent = _convolution_tangent(func, x, tx, weight, None, count, args, kwargs)
        if images is not None:
            fresh = tangent is None
            if fresh:
                tangent = torch.empty((count, *out.shape), dtype=out.dtype, device=out.device)
            for rows in slices:
                if fresh:
                    tangent[:, rows] = images(x[rows])
                else:
                    images(x[rows], tangent[:, rows])
    if tb is not None:
        channel = 1 if batched else 0
        bias_tangent = tb.reshape(count, *([1] * channel), -1, *([1] * (out.dim() - channel - 1)))
        tangent = bias_tangent if tangent is None else tangent.add_(bias_tangent)
    return mode.track(out, tangent, fresh=tx is not None or images is not None)


def _weight_images(mode, func, weight, args, kwargs):
    """(x, into=None) ↦ x ⊛ V_k for all k, shape (K, [B], C_out, ...), added into ``into`` if
    given: by the factors of structured tangents (without groups), else by the whole tangents;
    None if the weight carries none."""
    factors = mode.factors(weight) if arg(args, kwargs, 3, "groups", 1) == 1 else None
    if factors is not None:
        return lambda x, into=None: factored.convolved(func, x, weight, factors, args, kwargs, into)
    tw = mode.tangent(weight)
    if tw is None:
        return None

    def images(x, into=None):
        stacked = _weight_tangent_images(func, x, tw, args, kwargs)
        return stacked if into is None else into.add_(stacked)

    return images


def _convolution_tangent(func, x, tx, weight, images, count, args, kwargs) -> torch.Tensor:
    """ẋ_k ⊛ W + x ⊛ V_k for all k: one convolution of the K·B tangent images, and the weight
    tangents' images of x (``_weight_images``)."""
    batched = x.dim() == weight.dim()
    result = None
    if tx is not None:
        tangent_images = func(tx.flatten(0, 1) if batched else tx, weight, None, *args, **kwargs)
        shape = (count, *([x.shape[0]] if batched else []), *tangent_images.shape[1:])
        result = shaped(tangent_images, shape)
    if images is not None:
        result = images(x).contiguous() if result is None else images(x, result)
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


@rule("embedding", samples=_embedding_samples, owners=(F,), constant=(0,), structured=(1,))
def embedding(mode, func, indices, weight, padding_idx=None, max_norm=None, *args, **kwargs):
    """y = W[i]:  ẏ = Ẇ[i], the rows looked up in every tangent (by blocks for a large table;
    A_k[i] B_kᵀ for a structured tangent, only the looked-up rows formed)."""
    if max_norm is not None:  # it renormalises the rows it looks up, in place
        raise Decline("embedding with max_norm")
    if mode.carries(indices):
        raise Decline("embedding indices computed from parameters")
    out = func(indices, weight, padding_idx, max_norm, *args, **kwargs)
    factors = mode.factors(weight)
    if factors is not None:
        return mode.track(out, factored.looked_up(indices, factors), fresh=True)
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
