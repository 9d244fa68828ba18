"""Products with structured tangents, V_k = A_k B_kᵀ (``tangents.structured``), never formed.

A weight's K structured tangents arrive as factors A (K, m, r) and B (K, n, r), the weight viewed
as m = ``shape[0]`` rows of n values. Every product with V_k goes through the thin factors: its
cost is that of r columns of the weight instead of all n, which is what makes a forward-gradient
step cheaper than backprop's (the first layer's weight term almost free, every later layer
adding one product, ẋ Wᵀ, instead of backprop's two).
"""

from __future__ import annotations

import math

import torch

from forwardgrad.jvp.rules.registry import arg

Factors = tuple[torch.Tensor, torch.Tensor]


def transposed(factors: Factors) -> Factors:
    """The factors of V_kᵀ = B_k A_kᵀ (a weight stored in × out, as ``addmm`` and ``matmul``
    use it)."""
    a, b = factors
    return b, a


def add_rows_times(
    target: torch.Tensor, rows: torch.Tensor, factors: Factors, beta: float = 1
) -> torch.Tensor:
    """target_k ← β·target_k + rows V_kᵀ = β·target_k + (rows B_k) A_kᵀ, in place.

    ``target`` (K, N, m), ``rows`` (N, n): one product of ``rows`` with the K·r columns of B,
    then K products of inner size r (an outer product for K = r = 1).
    """
    a, b = factors
    count, n, rank = b.shape
    if count == 1:
        projected = (rows @ b[0]).unsqueeze(0)  # (1, N, r)
    else:
        projected = (rows @ b.transpose(0, 1).reshape(n, count * rank)).view(-1, count, rank)
        projected = projected.transpose(0, 1)  # (K, N, r)
    if count == 1 and rank == 1:
        target[0].addr_(projected[0, :, 0], a[0, :, 0], beta=beta)
        return target
    if rank == 1:  # K outer products; baddbmm with inner size 1 runs 15 times slower
        if beta == 0:
            return torch.mul(projected, a.transpose(1, 2), out=target)
        return target.addcmul_(projected, a.transpose(1, 2))
    return target.baddbmm_(projected, a.transpose(1, 2), beta=beta)


def add_times_columns(
    target: torch.Tensor, factors: Factors, columns: torch.Tensor, beta: float = 1
) -> torch.Tensor:
    """target_k ← β·target_k + V_k columns = β·target_k + A_k (B_kᵀ columns), in place.

    ``target`` (K, m, c), ``columns`` (n, c).
    """
    a, b = factors
    return target.baddbmm_(a, b.transpose(1, 2) @ columns, beta=beta)


def convolved(func, x, weight, factors: Factors, args, kwargs, into=None) -> torch.Tensor:
    """x ⊛ V_k for all k, the kernel (C_out, C_in, *kernel) viewed as C_out × (C_in·∏kernel),
    without groups: the K·r images x ⊛ b_kj (``_filter_images``), then output channel o of
    tangent k is Σ_j A_k[o, j] (x ⊛ b_kj). Shape (K, [B], C_out, ...); added into ``into`` (of
    that shape) when given, for rank 1 without a temporary of that size."""
    a, b = factors
    count, channels, rank = a.shape
    images = _filter_images(func, x, weight, b, args, kwargs)  # ([B], K·r, ...)
    batched = x.dim() == weight.dim()
    if not batched:
        images = images.unsqueeze(0)
    size, spatial = images.shape[0], images.shape[2:]
    images = images.reshape(size, count, rank, -1).transpose(0, 1)  # (K, B, r, S)
    if rank == 1 and into is not None and into.is_contiguous():
        into.view(count, size, channels, -1).addcmul_(images, a.view(count, 1, channels, 1))
        return into
    if rank == 1:
        result = images * a.view(count, 1, channels, 1)
    else:
        result = torch.matmul(a.unsqueeze(1), images)  # (K, B, C_out, S)
    result = result.view(count, size, channels, *spatial)
    result = result if batched else result.squeeze(1)
    return result if into is None else into.add_(result)


def _filter_images(func, x, weight, b, args, kwargs) -> torch.Tensor:
    """x ⊛ b_kj for the K·r filters b_kj (C_in, *kernel): ([B], K·r, ...).

    One convolution with the K·r filters; or, when x has more channels than the K·r filters
    have positions in all (K·r·P <= C_in, P = ∏kernel > 1), x ⊛ b = Σ_p shift_p(Σ_c b[c, p] x_c):
    the inner sums are one matrix product of the K·r·P rows of b with x's channels, the shifts a
    grouped convolution with one-hot kernels. A convolution with one or a few output channels
    runs far below oneDNN's peak; a matrix product with K·r·P rows does not."""
    count, _, rank = b.shape
    channels, kernel = weight.shape[1], weight.shape[2:]
    positions = math.prod(kernel)
    filters = b.transpose(1, 2).reshape(count * rank, channels, positions)
    if positions == 1 or count * rank * positions > channels:
        return func(x, filters.view(count * rank, channels, *kernel), None, *args, **kwargs)
    rows = filters.transpose(1, 2).reshape(count * rank * positions, channels)
    sums = torch.matmul(rows, x.flatten(-len(kernel)))  # ([B], K·r·P, S)
    sums = sums.view(*sums.shape[:-1], *x.shape[-len(kernel) :])
    one_hot = torch.eye(positions, dtype=x.dtype, device=x.device).view(1, positions, *kernel)
    stride, padding = arg(args, kwargs, 0, "stride", 1), arg(args, kwargs, 1, "padding", 0)
    dilation = arg(args, kwargs, 2, "dilation", 1)
    shifts = one_hot.expand(count * rank, positions, *kernel)
    return func(sums, shifts, None, stride, padding, dilation, count * rank)


def looked_up(indices: torch.Tensor, factors: Factors) -> torch.Tensor:
    """V_k[indices] = A_k[indices] B_kᵀ, shape (K, *indices.shape, n): the rows of A that the
    indices pick, times B."""
    a, b = factors
    picked = a[:, indices.reshape(-1)]  # (K, L, r)
    if a.shape[2] == 1:
        rows = picked * b.transpose(1, 2)
    else:
        rows = torch.bmm(picked, b.transpose(1, 2))
    return rows.view(a.shape[0], *indices.shape, b.shape[1])
