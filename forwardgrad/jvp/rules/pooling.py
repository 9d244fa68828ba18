"""Rules for pooling: max pooling passes each window's maximum's tangent through; average
pooling is linear, so the tangent is pooled the same way."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forwardgrad.jvp.rules.registry import batch_slices, randn, rule, shaped


def _max_pool_samples(dtype):
    yield (randn(2, 3, 6, 6, dtype=dtype), 2), {}
    yield (randn(2, 3, 7, 7, dtype=dtype), 3), {"stride": 2, "padding": 1}
    yield (randn(3, 6, 6, dtype=dtype), 2), {"return_indices": True}


@rule(
    "max_pool2d",
    samples=_max_pool_samples,
    owners=(torch, F),
    functions=(F.max_pool2d_with_indices,),
)
def max_pool2d(mode, func, x, *args, **kwargs):
    """y = max over each window:  ẏ = ẋ at the position of each window's maximum."""
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    options = dict(zip(names, args))
    options.update(kwargs)
    wants_indices = options.pop("return_indices", func is F.max_pool2d_with_indices)
    if options.get("stride") == ():  # torch.max_pool2d's default: the kernel size
        options["stride"] = None
    tx, count = mode.tangent(x), mode.count
    slices = [slice(None)] if wants_indices or x.dim() == 3 else batch_slices(x, 2)
    if len(slices) == 1:
        out, indices = F.max_pool2d(x, **options, return_indices=True)
        mode.track(out, _gather_maxima(tx, indices, count), fresh=True)
        return (out, indices) if wants_indices else out
    # Big: the int64 indices of the whole batch would be an activation-sized temporary; pool
    # again a slice at a time for the tangent instead.
    out = F.max_pool2d(x, **options)
    tangent = torch.empty((count, *out.shape), dtype=tx.dtype, device=tx.device)
    for rows in slices:
        _, indices = F.max_pool2d(x[rows], **options, return_indices=True)
        tangent[:, rows] = _gather_maxima(tx[:, rows], indices, count)
    return mode.track(out, tangent, fresh=True)


def _gather_maxima(tx: torch.Tensor, indices: torch.Tensor, count: int) -> torch.Tensor:
    """ẏ = ẋ at the position of each maximum, for every tangent."""
    where = indices.flatten(-2).expand(count, *indices.shape[:-2], -1)
    return shaped(tx.flatten(-2).gather(-1, where), (count, *indices.shape))


def _avg_pool_samples(dtype):
    yield (randn(2, 3, 6, 6, dtype=dtype), 2), {}
    yield (randn(3, 6, 6, dtype=dtype), 3), {"stride": 1}


@rule("avg_pool2d", samples=_avg_pool_samples, owners=(F,))
def avg_pool2d(mode, func, x, *args, **kwargs):
    """y = the mean of each window:  ẏ = the mean of ẋ over the same windows."""
    return _pooled(mode, func, x, *args, **kwargs)


def _adaptive_samples(dtype):
    yield (randn(2, 3, 6, 6, dtype=dtype), 1), {}
    yield (randn(2, 3, 7, 5, dtype=dtype), (3, 2)), {}


@rule("adaptive_avg_pool2d", samples=_adaptive_samples, owners=(F,))
def adaptive_avg_pool2d(mode, func, x, *args, **kwargs):
    """y = the mean of each adaptive window:  ẏ = the mean of ẋ over the same windows."""
    return _pooled(mode, func, x, *args, **kwargs)


def _pooled(mode, func, x, *args, **kwargs):
    out = func(x, *args, **kwargs)
    tx = mode.tangent(x)
    batched = x.dim() == 4
    tangent = func(tx.flatten(0, 1) if batched else tx, *args, **kwargs)
    return mode.track(out, shaped(tangent, (mode.count, *out.shape)), fresh=True)
