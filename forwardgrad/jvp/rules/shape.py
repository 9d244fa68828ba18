"""Rules for operations that move, select, combine or reduce elements without arithmetic on them
beyond sums: the tangent goes through the same operation, shifted by one leading dimension (K).
"""

from __future__ import annotations

import torch

from forwardgrad.jvp.rules.registry import Decline, arg, lift, randn, rule

_TENSOR = (torch.Tensor,)


def _reshape_samples(dtype):
    x = randn(2, 3, 4, dtype=dtype)
    yield (x, (6, 4)), {}
    yield (x, -1), {}


@rule("reshape", samples=_reshape_samples)
def reshape(mode, func, x, *args, **kwargs):
    """y = x with another shape:  ẏ = ẋ with that shape (each of the K tangents)."""
    return _same_elements(mode, func, x, *args, **kwargs)


def _flatten_samples(dtype):
    yield (randn(2, 3, 4, dtype=dtype),), {}
    yield (randn(2, 3, 4, dtype=dtype), 1), {}


@rule("flatten", samples=_flatten_samples)
def flatten(mode, func, x, *args, **kwargs):
    """y = flatten(x):  ẏ = flatten(ẋ) in the same order."""
    return _same_elements(mode, func, x, *args, **kwargs)


def _squeeze_samples(dtype):
    yield (randn(2, 1, 4, dtype=dtype),), {}
    yield (randn(2, 1, 4, dtype=dtype), 1), {}


@rule("squeeze", "unsqueeze", samples=_squeeze_samples)
def squeeze(mode, func, x, *args, **kwargs):
    """y = x with a size-1 dimension removed or added:  ẏ = ẋ reshaped alike."""
    return _same_elements(mode, func, x, *args, **kwargs)


def _unflatten_samples(dtype):
    yield (randn(2, 12, dtype=dtype), 1, (3, 4)), {}


@rule("unflatten", samples=_unflatten_samples)
def unflatten(mode, func, x, *args, **kwargs):
    """y = x with one dimension split:  ẏ = ẋ split alike."""
    return _same_elements(mode, func, x, *args, **kwargs)


def _view_samples(dtype):
    yield (randn(2, 3, 4, dtype=dtype), 6, 4), {}
    yield (randn(2, 3, 4, dtype=dtype), randn(24, dtype=dtype)), {}


@rule("view", "view_as", "reshape_as", samples=_view_samples, owners=_TENSOR, constant=(1,))
def view(mode, func, x, *args, **kwargs):
    """y = x.view(shape):  ẏ = ẋ with that shape."""
    return _same_elements(mode, func, x, *args, **kwargs)


def _clone_samples(dtype):
    yield (randn(2, 3, dtype=dtype),), {}


@rule("clone", "contiguous", samples=_clone_samples)
def clone(mode, func, x, *args, **kwargs):
    """y = a copy of x:  ẏ = ẋ."""
    return _same_elements(mode, func, x, *args, **kwargs)


def _same_elements(mode, func, x, *args, **kwargs):
    out = func(x, *args, **kwargs)
    if not isinstance(out, torch.Tensor) or out.numel() != x.numel() or out.dtype != x.dtype:
        raise Decline(f"{getattr(func, '__name__', func)} that changes the elements")
    return mode.track(out, mode.tangent(x).reshape(mode.count, *out.shape))


def _to_samples(dtype):
    yield (randn(2, 3, dtype=dtype),), {}
    yield (randn(2, 3, dtype=dtype), torch.float32), {}
    yield (randn(2, 3, dtype=dtype),), {"dtype": torch.float64}


@rule("to", "float", "double", samples=_to_samples, owners=_TENSOR)
def to(mode, func, x, *args, **kwargs):
    """y = x in another dtype or place:  ẏ = ẋ converted alike (none for an integer result)."""
    out = func(x, *args, **kwargs)
    if not out.is_floating_point():
        return out
    return mode.track(out, mode.tangent(x).to(dtype=out.dtype, device=out.device))


def _transpose_samples(dtype):
    yield (randn(2, 3, 4, dtype=dtype), 0, 2), {}
    yield (randn(2, 3, 4, dtype=dtype), -1, 1), {}


@rule("transpose", "swapaxes", samples=_transpose_samples)
def transpose(mode, func, x, *args, **kwargs):
    """y = x with two dimensions swapped:  ẏ = ẋ with the same two swapped."""
    out = func(x, *args, **kwargs)
    dims = [arg(args, kwargs, 0, "dim0"), arg(args, kwargs, 1, "dim1")]
    dims = [d % x.dim() + 1 for d in dims]
    return mode.track(out, mode.tangent(x).transpose(*dims))


def _t_samples(dtype):
    yield (randn(3, 4, dtype=dtype),), {}
    yield (randn(4, dtype=dtype),), {}


@rule("t", samples=_t_samples)
def transpose_last(mode, func, x, *args, **kwargs):
    """y = xᵀ (at most two dimensions; also Tensor.T and Tensor.mT):  ẏ = ẋᵀ."""
    if x.dim() > 2 and getattr(getattr(func, "__self__", None), "__name__", "") == "T":
        raise Decline("Tensor.T on more than two dimensions")
    out = func(x, *args, **kwargs)
    if x.dim() < 2:
        return mode.track(out, mode.tangent(x))
    return mode.track(out, mode.tangent(x).transpose(-1, -2))


def _permute_samples(dtype):
    yield (randn(2, 3, 4, dtype=dtype), (2, 0, 1)), {}
    yield (randn(2, 3, 4, dtype=dtype), 1, 0, 2), {}


@rule("permute", samples=_permute_samples)
def permute(mode, func, x, *dims, **kwargs):
    """y = x with its dimensions reordered:  ẏ = ẋ reordered alike."""
    out = func(x, *dims, **kwargs)
    order = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
    order = kwargs.get("dims", order)
    return mode.track(out, mode.tangent(x).permute(0, *[d % x.dim() + 1 for d in order]))


def _expand_samples(dtype):
    yield (randn(1, 3, dtype=dtype), 4, 3), {}
    yield (randn(3, dtype=dtype), (2, 5, 3)), {}
    yield (randn(1, 3, dtype=dtype), -1, 3), {}


@rule("expand", samples=_expand_samples, owners=_TENSOR)
def expand(mode, func, x, *sizes):
    """y = x broadcast to a shape:  ẏ = ẋ broadcast alike (a view, no copy)."""
    out = func(x, *sizes)
    return mode.track(out, lift(mode.tangent(x), out.dim()).expand(mode.count, *out.shape))


def _getitem_samples(dtype):
    x = randn(4, 5, dtype=dtype)
    yield (x, (slice(1, 3), 2)), {}
    yield (x, torch.tensor([0, 2, 2])), {}
    yield (x, (Ellipsis, None, slice(None, None, 2))), {}


@rule("__getitem__", samples=_getitem_samples, owners=_TENSOR)
def getitem(mode, func, x, index):
    """y = x[index]:  ẏ = ẋ[:, index] (the same elements of every tangent)."""
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, list) and any(isinstance(j, (list, tuple)) for j in i) for i in index):
        raise Decline("indexing with nested lists")
    advanced = [i for i in index if isinstance(i, (torch.Tensor, list))]
    if len(advanced) > 1:
        raise Decline("indexing with several index tensors")
    if any(mode.carries(i) for i in advanced):
        raise Decline("an index computed from the parameters")
    out = func(x, index)
    return mode.track(out, mode.tangent(x)[(slice(None), *index)])


def _reduce_samples(dtype):
    x = randn(2, 3, 4, dtype=dtype)
    yield (x,), {}
    yield (x, 1), {}
    yield (x, (0, 2), True), {}
    yield (x,), {"dim": -1, "keepdim": True}


@rule("sum", "mean", samples=_reduce_samples)
def sum_or_mean(mode, func, x, *args, **kwargs):
    """y = Σ x (or the mean) over some dimensions:  ẏ = Σ ẋ (or its mean) over the same."""
    if arg(args, kwargs, 2, "dtype") is not None:
        raise Decline(f"{func.__name__} with a dtype")
    out = func(x, *args, **kwargs)
    tx = mode.tangent(x)
    dim = arg(args, kwargs, 0, "dim")
    keepdim = bool(arg(args, kwargs, 1, "keepdim", False))
    reduce = torch.mean if func.__name__ == "mean" else torch.sum
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        tangent = reduce(tx.reshape(mode.count, -1), dim=1)
    else:
        dims = [dim] if isinstance(dim, int) else list(dim)
        tangent = reduce(tx, dim=[d % max(x.dim(), 1) + 1 for d in dims], keepdim=keepdim)
    return mode.track(out, tangent.to(out.dtype).reshape(mode.count, *out.shape))


def _cat_samples(dtype):
    a, b = randn(2, 3, dtype=dtype), randn(2, 3, dtype=dtype)
    yield ([a, b],), {}
    yield ([a, b], 1), {}
    yield ((a, b),), {"dim": -1}


@rule("cat", "concat", "concatenate", "stack", samples=_cat_samples)
def concatenate(mode, func, tensors, dim=0, **kwargs):
    """y = [a; b; ...] along a dimension:  ẏ = [ȧ; ḃ; ...] along it (zeros for constants)."""
    if kwargs.get("out") is not None:
        raise Decline(f"{func.__name__} with out=")
    out = func(tensors, dim, **kwargs)
    parts = []
    for t in tensors:
        tangent = mode.tangent(t)
        if tangent is None:
            tangent = torch.zeros((mode.count, *t.shape), dtype=out.dtype, device=out.device)
        parts.append(tangent.to(out.dtype))
    # stack adds a dimension, so its dim may be one past the inputs' last.
    return mode.track(out, func(parts, dim % out.dim() + 1))


def _split_samples(dtype):
    x = randn(4, 6, dtype=dtype)
    yield (x, 2), {}
    yield (x, [1, 3]), {"dim": 0}
    yield (x, 3, 1), {}


@rule("split", "split_with_sizes", samples=_split_samples)
def split(mode, func, x, split_size_or_sections, dim=0):
    """(y₁, y₂, ...) = x cut along a dimension:  ẏᵢ = ẋ cut the same way."""
    outs = func(x, split_size_or_sections, dim)
    pieces = torch.split(mode.tangent(x), split_size_or_sections, dim % x.dim() + 1)
    for out, tangent in zip(outs, pieces):
        mode.track(out, tangent)
    return outs


def _chunk_samples(dtype):
    yield (randn(4, 6, dtype=dtype), 2), {}
    yield (randn(4, 6, dtype=dtype), 4, 1), {}


@rule("chunk", samples=_chunk_samples)
def chunk(mode, func, x, chunks, dim=0):
    """(y₁, y₂, ...) = x in chunks along a dimension:  ẏᵢ = ẋ in the same chunks."""
    outs = func(x, chunks, dim)
    sizes = [out.shape[dim] for out in outs]
    for out, tangent in zip(outs, torch.split(mode.tangent(x), sizes, dim % x.dim() + 1)):
        mode.track(out, tangent)
    return outs


def _unbind_samples(dtype):
    yield (randn(3, 4, dtype=dtype),), {}
    yield (randn(3, 4, 2, dtype=dtype), 1), {}


@rule("unbind", samples=_unbind_samples)
def unbind(mode, func, x, dim=0):
    """(y₁, y₂, ...) = the slices of x along a dimension:  ẏᵢ = the same slices of ẋ."""
    outs = func(x, dim)
    for out, tangent in zip(outs, torch.unbind(mode.tangent(x), dim % x.dim() + 1)):
        mode.track(out, tangent)
    return outs
