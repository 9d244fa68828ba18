"""Shared by the statistical tests: the moments of one forward gradient g = (∇f·v) v, dense or
structured (the formulas derived in ``forwardgrad.tangents.structured``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

MU4 = {"normal": 3.0, "rademacher": 1.0}  # the fourth moment of one entry (or factor entry)


def _structured(block: torch.Tensor, rank: int | None) -> bool:
    return rank is not None and block.dim() >= 2 and min(block.shape[0], block[0].numel()) > rank


def excess(block: torch.Tensor, distribution: str, rank: int | None) -> float:
    """c_b in E‖g‖² = n‖∇f‖² + Σ_b c_b ‖G_b‖² for a block shaped like ``block``."""
    mu = MU4[distribution] - 1
    if not _structured(block, rank):
        return mu  # 2 for normal, 0 for Rademacher
    m, n = block.shape[0], math.prod(block.shape[1:])
    return (mu * (m + n) + mu**2 + 2 * (rank - 1)) / rank


def second_moment(gradient: Sequence[torch.Tensor], distribution: str, rank: int | None):
    """E‖g‖² for the gradient blocks ``gradient`` (one per parameter)."""
    n = sum(g.numel() for g in gradient)
    total = sum(float(g.pow(2).sum()) for g in gradient)
    return n * total + sum(excess(g, distribution, rank) * float(g.pow(2).sum()) for g in gradient)


def coordinate_variance(
    gradient: Sequence[torch.Tensor], distribution: str, rank: int | None
) -> torch.Tensor:
    """Var(g_i) for every coordinate, flattened in parameter order: ‖∇f‖² ± G_i² for a dense
    normal (+) or Rademacher (−) block; for a structured one, with row and column norms R_p, C_q,
    ‖∇f‖² − G_pq² + ((μ₄ − 1)(R_p + C_q) + ((μ₄ − 1)² + 2(r − 1)) G_pq²) / r."""
    total = sum(float(g.pow(2).sum()) for g in gradient)
    mu = MU4[distribution] - 1
    parts = []
    for g in gradient:
        if not _structured(g, rank):
            parts.append(total + (mu - 1) * g.pow(2))
            continue
        matrix = g.reshape(g.shape[0], -1)
        rows, cols = matrix.pow(2).sum(1, keepdim=True), matrix.pow(2).sum(0, keepdim=True)
        spread = mu * (rows + cols) + (mu**2 + 2 * (rank - 1)) * matrix.pow(2)
        parts.append(total - matrix.pow(2) + spread / rank)
    return torch.cat([p.reshape(-1) for p in parts])
