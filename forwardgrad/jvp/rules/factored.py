"""Products with structured tangents, V_k = A_k B_kᵀ (``tangents.structured``), never formed.

A weight's K structured tangents arrive as factors A (K, m, r) and B (K, n, r), the weight viewed
as m = ``shape[0]`` rows of n values. Every product with V_k goes through the thin factors: its
cost is that of r columns of the weight instead of all n, which is what makes a forward-gradient
step cheaper than backprop's (the first layer's weight term almost free, every later layer
adding one product, ẋ Wᵀ, instead of backprop's two).
"""

from __future__ import annotations

import torch

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
    return target.baddbmm_(projected, a.transpose(1, 2), beta=beta)


def add_times_columns(
    target: torch.Tensor, factors: Factors, columns: torch.Tensor, beta: float = 1
) -> torch.Tensor:
    """target_k ← β·target_k + V_k columns = β·target_k + A_k (B_kᵀ columns), in place.

    ``target`` (K, m, c), ``columns`` (n, c).
    """
    a, b = factors
    return target.baddbmm_(a, b.transpose(1, 2) @ columns, beta=beta)


def convolved(func, x, weight, factors: Factors, args, kwargs) -> torch.Tensor:
    """x ⊛ V_k for all k, the kernel (C_out, C_in, *kernel) viewed as C_out × (C_in·∏kernel),
    without groups: one convolution of x with the K·r filters b_kj, then output channel o of
    tangent k is Σ_j A_k[o, j] (x ⊛ b_kj). Shape (K, [B], C_out, ...)."""
    a, b = factors
    count, channels, rank = a.shape
    filters = b.transpose(1, 2).reshape(count * rank, *weight.shape[1:])
    images = func(x, filters, None, *args, **kwargs)  # ([B], K·r, ...)
    batched = x.dim() == weight.dim()
    if not batched:
        images = images.unsqueeze(0)
    size, spatial = images.shape[0], images.shape[2:]
    images = images.reshape(size, count, rank, -1).transpose(0, 1)  # (K, B, r, S)
    if rank == 1:
        result = images * a.view(count, 1, channels, 1)
    else:
        result = torch.matmul(a.unsqueeze(1), images)  # (K, B, C_out, S)
    result = result.view(count, size, channels, *spatial)
    return result if batched else result.squeeze(1)


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
