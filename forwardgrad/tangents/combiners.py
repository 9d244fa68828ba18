"""Combiners: K directional derivatives and their K tangents into one gradient estimate.

A *combiner* turns the K directional derivatives d_k = ∇f·v_k into coefficients c such that the
estimate is g = Σ_k c_k v_k. Keeping the estimate in this form lets callers regenerate the
tangents from a seed instead of holding them (ForwardSGD, data-parallel training).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from forwardgrad.errors import ConfigurationError

COMBINERS = ("mean", "projection")


def check_combine(combine: str) -> str:
    """Return ``combine`` if it names a combiner, else raise an error that lists them."""
    if not isinstance(combine, str) or combine not in COMBINERS:
        raise ConfigurationError(
            f"unknown combine {combine!r}; choose one of {', '.join(COMBINERS)}."
        )
    return combine


def mean_coefficients(derivatives: torch.Tensor) -> torch.Tensor:
    """Coefficients of the mean of K forward gradients: g = (1/K) Σ_k d_k v_k.

    Unbiased for any tangent distribution with E[v vᵀ] = I; its covariance is 1/K of one
    forward gradient's when the tangents are independent.
    """
    return derivatives / derivatives.numel()


def gram_matrix(tangents: Sequence[torch.Tensor]) -> torch.Tensor:
    """BᵀB for B = [v_1 .. v_K], accumulated over parameters in float64 (K x K)."""
    count = tangents[0].shape[0]
    gram = torch.zeros(count, count, dtype=torch.float64, device=tangents[0].device)
    for v in tangents:
        flat = v.reshape(count, -1).to(device=gram.device, dtype=torch.float64)
        gram += flat @ flat.T
    return gram


def projection_coefficients(
    derivatives: torch.Tensor, gram: torch.Tensor, num_params: int
) -> torch.Tensor:
    """Coefficients of the scaled orthogonal projection of ∇f onto span(v_1..v_K).

    With B = [v_1 .. v_K] and d = Bᵀ∇f (the K directional derivatives), the projection is
    P∇f = B (BᵀB)⁺ d (Flügel et al. 2024), computed from d alone. We return it scaled by
    n / rank(B):

        g = (n / rank B) · B (BᵀB)⁺ d.

    For any tangent law invariant under signed permutations of the coordinates (normal,
    Rademacher, orthogonal) E[P] = c·I and trace(P) = rank B, so this scaling makes g unbiased,
    E[g] = ∇f, also when B is rank deficient. With K >= n and B of full rank, P = I and g = ∇f
    exactly. (Flügel et al. instead rescale by a ratio of expected norms; we prefer the unbiased
    form so that every combiner estimates the same quantity.)
    """
    pinv = torch.linalg.pinv(gram, hermitian=True)
    rank = int(torch.linalg.matrix_rank(gram, hermitian=True))
    coefficients = pinv @ derivatives.to(torch.float64)
    return coefficients * (num_params / max(rank, 1))


def combine_tangents(
    coefficients: torch.Tensor, tangents: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """g = Σ_k c_k v_k: one tensor of the parameter's shape per tangent tensor."""
    return [
        torch.tensordot(coefficients.to(device=v.device, dtype=v.dtype), v, dims=1)
        for v in tangents
    ]


def combine(
    derivatives: torch.Tensor, tangents: Sequence[torch.Tensor], how: str = "mean"
) -> list[torch.Tensor]:
    """Turn K directional derivatives and their K tangents into one gradient estimate.

    Args:
      derivatives: the K directional derivatives d_k = ∇f·v_k.
      tangents: one ``(K, *shape)`` tensor per parameter.
      how: ``"mean"`` (see ``mean_coefficients``) or ``"projection"`` (see
        ``projection_coefficients``).

    Returns:
      One gradient-estimate tensor per parameter.
    """
    check_combine(how)
    if how == "mean":
        coefficients = mean_coefficients(derivatives)
    else:
        num_params = sum(v[0].numel() for v in tangents)
        coefficients = projection_coefficients(derivatives, gram_matrix(tangents), num_params)
    return combine_tangents(coefficients, tangents)
