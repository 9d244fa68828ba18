"""Tangent samplers and combiners: the functional core of every forward-gradient estimator.

A *tangent* is a random direction v in parameter space. Its components are zero-mean with
E[v vᵀ] = I, so that the forward gradient (∇f·v) v is an unbiased estimate of ∇f
(Baydin et al. 2022, "Gradients without Backpropagation").

Tangents for K directions over a list of parameter tensors are a list of tensors shaped
``(K, *param.shape)``: entry k of every tensor, taken together, is the k-th direction.

A *combiner* turns the K directional derivatives d_k = ∇f·v_k into coefficients c such that the
estimate is g = Σ_k c_k v_k. Keeping the estimate in this form lets callers regenerate the
tangents from a seed instead of holding them (ForwardSGD, distributed training).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

DISTRIBUTIONS = ("normal", "rademacher", "orthogonal")
COMBINERS = ("mean", "projection")


def check_distribution(distribution: str, allowed: Sequence[str] = DISTRIBUTIONS) -> str:
    """Return ``distribution`` if it is in ``allowed``, else raise a ValueError listing them."""
    if not isinstance(distribution, str) or distribution not in allowed:
        raise ValueError(
            f"unknown tangent distribution {distribution!r}; choose one of {', '.join(allowed)}."
        )
    return distribution


def check_combine(combine: str) -> str:
    """Return ``combine`` if it names a combiner, else raise a ValueError that lists them."""
    if not isinstance(combine, str) or combine not in COMBINERS:
        raise ValueError(f"unknown combine {combine!r}; choose one of {', '.join(COMBINERS)}.")
    return combine


def check_count(tangents: int) -> int:
    """Return the number of tangents if it is a positive integer, else raise."""
    if isinstance(tangents, bool) or not isinstance(tangents, int) or tangents < 1:
        raise ValueError(f"tangents must be a positive integer (1, 2, ...), got {tangents!r}.")
    return tangents


def sample_tangents(
    params: Sequence[torch.Tensor],
    count: int,
    distribution: str = "normal",
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Draw ``count`` random directions over ``params``.

    Every distribution has E[v vᵀ] = I over the flattened parameters:

    - ``"normal"``: v ~ N(0, I).
    - ``"rademacher"``: independent ±1 signs.
    - ``"orthogonal"``: v_k = √n q_k with q_1..q_K orthonormal and Haar-distributed (QR of a
      Gaussian matrix with the sign fix of Mezzadri 2007), n the total number of parameters;
      needs K <= n.

    Args:
      params: tensors whose shapes, dtypes and devices the tangents take.
      count: K, the number of directions.
      distribution: one of ``DISTRIBUTIONS``.
      generator: the source of randomness; ``None`` uses torch's global generator.

    Returns:
      A list with one tensor of shape ``(K, *p.shape)`` per parameter.
    """
    check_count(count)
    check_distribution(distribution)
    if distribution == "orthogonal":
        return _orthogonal(params, count, generator)
    return [_draw(distribution, (count, *p.shape), p, generator) for p in params]


def _draw(
    distribution: str, shape: tuple, like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    # Sample on the generator's device, then move: the same seed gives the same numbers whether
    # the parameters live on the CPU or an accelerator.
    device = generator.device if generator is not None else like.device
    out = torch.empty(shape, dtype=like.dtype, device=device)
    if distribution == "normal":
        out.normal_(generator=generator)
    else:
        out.bernoulli_(0.5, generator=generator).mul_(2).sub_(1)
    return out.to(like.device)


def _orthogonal(
    params: Sequence[torch.Tensor], count: int, generator: torch.Generator | None
) -> list[torch.Tensor]:
    n = sum(p.numel() for p in params)
    if count > n:
        raise ValueError(
            f"orthogonal tangents need tangents <= the number of parameters ({n}), got {count}; "
            "use fewer tangents or the 'normal' distribution."
        )
    device = generator.device if generator is not None else params[0].device
    gaussian = torch.randn(n, count, dtype=torch.float64, device=device, generator=generator)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    directions = (q * signs).T.mul_(math.sqrt(n))  # (K, n)
    out, start = [], 0
    for p in params:
        chunk = directions[:, start : start + p.numel()]
        out.append(chunk.reshape(count, *p.shape).to(dtype=p.dtype, device=p.device))
        start += p.numel()
    return out


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
