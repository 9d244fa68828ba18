"""Structured tangents: a weight matrix's tangent as a sum of r outer products.

A parameter with two or more dimensions is viewed as a matrix of m = ``shape[0]`` rows and
n = ``numel / m`` columns: a linear weight out × in, a convolution kernel out × (in/groups·kh·kw),
an embedding table rows × dim, GPT-2's ``Conv1D`` weight in × out. Its k-th tangent is

    V_k = (1/√r) Σ_{j=1..r} a_kj b_kjᵀ = A_k B_kᵀ,   A_k = [a_k1 .. a_kr] / √r  (m × r),
                                                      B_k = [b_k1 .. b_kr]       (n × r),

with the entries of every a and b independent, of mean 0, variance 1 and fourth moment μ₄
(normal: 3, Rademacher: 1). A layer's product with it costs O(B·(m + n)·r) instead of O(B·m·n),
x V_kᵀ = (x B_k) A_kᵀ, and only (m + n)·r numbers are drawn. Vectors (biases, norm weights) and
matrices with min(m, n) <= r keep dense tangents: there a rank-r tangent is full rank and its
products cost more than the dense ones.

Moments (a, b independent, so only paired indices survive):

- E[V_pq V_p'q'] = (1/r) Σ_j E[a_jp a_jp'] E[b_jq b_jq'] = δ_pp' δ_qq': E[vec V vec Vᵀ] = I, and
  the forward gradient g = (∇f·v) v is unbiased.
- For one tangent v over all parameters, blocks b of n_b values independent, G_b the gradient
  of block b (m × n for a matrix) and n = Σ n_b:

      E‖g‖² = n ‖∇f‖² + Σ_b c_b ‖G_b‖²,

  c_b = 2 for a dense normal block, 0 for a dense Rademacher one, and for a structured block
  c_b = ((μ₄ − 1)(m + n) + (μ₄ − 1)² + 2(r − 1)) / r, i.e. 2 + 2(m + n + 1)/r (normal) and
  2(1 − 1/r) (Rademacher). (Sum over the r⁴ index tuples of E[(aᵀGb)(aᵀGb)(aᵀa)(bᵀb)]: the
  r(r − 1) pairs j ≠ l give mn‖G‖² + 2‖G‖², the r diagonal ones (m − 1 + μ₄)(n − 1 + μ₄)‖G‖².)
  The excess over the dense law is of order (m + n)/r against n: the same order.
- Per coordinate of a structured block, with R_p = ‖G_p·‖² and C_q = ‖G_·q‖² its row and
  column norms,

      Var(g_pq) = ‖∇f‖² − G_pq² + ((μ₄ − 1)(R_p + C_q) + ((μ₄ − 1)² + 2(r − 1)) G_pq²) / r.

Each parameter's factors are a pure function of the step's seed, the parameter's index and the
tangent's number (``parameter_factors``), drawn with the dense tangents' streams
(``tangents.streams``) under their own derived seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

import torch

from forwardgrad.errors import ConfigurationError
from forwardgrad.seeds import derive_seed
from forwardgrad.tangents.distributions import STREAMABLE, check_distribution
from forwardgrad.tangents.streams import fill_tangent, parameter_tangents

Factors = tuple[torch.Tensor, torch.Tensor]  # A (K, m, r) holding a/√r, B (K, n, r)

_PURPOSE = "structured"  # the factors' streams: derive_seed(step seed, _PURPOSE), index, k


def check_rank(rank: object) -> int | None:
    """Return ``rank`` (None: dense tangents) if it is None or a positive integer, else raise."""
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, Integral) or rank < 1:
        raise ConfigurationError(
            f"rank must be None (dense tangents) or a positive integer (1, 2, ...), got {rank!r}."
        )
    return int(rank)


def check_structured(rank: object, distribution: str, combine: str = "mean") -> int | None:
    """``check_rank(rank)``, and refuse the settings structured tangents cannot take.

    Orthogonal tangents couple every coordinate of the K directions; a structured tangent is a
    product of independent factors. The scaled projection g = (n / rank B) B (BᵀB)⁺ d is
    unbiased for laws invariant under signed permutations of all coordinates; structured
    tangents are invariant only under those of each matrix's rows and columns, so E[P] is
    c_b·I on each block b with c_b differing between blocks, and the estimate is biased.
    """
    rank = check_rank(rank)
    if rank is not None and distribution not in STREAMABLE:
        raise ConfigurationError(
            f"structured tangents (rank={rank}) take distribution 'normal' or 'rademacher', "
            f"not {distribution!r}: orthogonal directions couple every coordinate."
        )
    if rank is not None and combine != "mean":
        raise ConfigurationError(
            f"structured tangents (rank={rank}) take combine='mean', not {combine!r}: the "
            "scaled projection is biased for them (it is unbiased only for laws invariant under "
            "signed permutations of all coordinates)."
        )
    return rank


def matrix_shape(p: torch.Tensor) -> tuple[int, int]:
    """(m, n): the parameter viewed as ``shape[0]`` rows of everything else."""
    rows = p.shape[0]
    return rows, (p.numel() // rows if rows else 0)


def is_structured(p: torch.Tensor, rank: int | None) -> bool:
    """Does ``p`` get a rank-``rank`` tangent (two or more dims, min(m, n) > rank)?"""
    return rank is not None and p.dim() >= 2 and min(matrix_shape(p)) > rank


def parameter_factors(
    like: torch.Tensor, count: int, distribution: str, seed: int, index: int, rank: int
) -> Factors:
    """The factors of parameter ``index``'s ``count`` structured tangents in step ``seed``.

    Returns ``(A, B)``, A of shape (K, m, r) holding a/√r and B of shape (K, n, r), so that
    V_k = A_k B_kᵀ; a pure function of ``(seed, index, k)``, the distribution, the shape, the
    dtype and ``rank``. Tangent k's a and b are the first (m + n)·r values of one stream (a
    first), drawn with ``streams.fill_tangent`` under the seed ``derive_seed(seed,
    "structured")``: one draw per parameter and tangent, which matters for small layers. The
    stream is drawn to a multiple of 64 values (whole words of Rademacher signs, no tail pass).
    """
    check_distribution(distribution, STREAMABLE)
    m, n = matrix_shape(like)
    length = -(-(m + n) * rank // 64) * 64
    values = torch.empty((count, length), dtype=like.dtype, device=like.device)
    stream = derive_seed(seed, _PURPOSE)
    for k in range(count):
        fill_tangent(values[k], distribution, stream, index, k)
    a = values[:, : m * rank].view(count, m, rank)
    if rank > 1:
        a.mul_(1 / math.sqrt(rank))
    return a, values[:, m * rank : (m + n) * rank].view(count, n, rank)


def materialise(factors: Factors, shape: Sequence[int]) -> torch.Tensor:
    """The K whole tangents A_k B_kᵀ, shape ``(K, *shape)``."""
    a, b = factors
    if a.shape[2] == 1:  # outer products: bmm with inner size 1 is far slower
        return (a * b.transpose(1, 2)).view(a.shape[0], *shape)
    # One mm per tangent, the product ``write_combination`` forms: bmm may sum the r terms in
    # another order on some CPUs, and every source must give the same bits for the same seed.
    out = a.new_empty(a.shape[0], a.shape[1], b.shape[1])
    for k in range(a.shape[0]):
        torch.mm(a[k], b[k].T, out=out[k])
    return out.view(a.shape[0], *shape)


def combined(factors: Factors, coefficients: Sequence[float] | torch.Tensor) -> Factors:
    """(A_c, B_c) with Σ_k c_k A_k B_kᵀ = A_c B_cᵀ: A_c (m, K·r) the c_k A_k side by side."""
    a, b = factors
    count, m, rank = a.shape
    c = torch.as_tensor(coefficients, dtype=a.dtype, device=a.device).reshape(count, 1, 1)
    left = (a * c).transpose(0, 1).reshape(m, count * rank)
    return left, b.transpose(0, 1).reshape(b.shape[1], count * rank)


def add_combination(
    out: torch.Tensor,
    factors: Factors,
    coefficients: Sequence[float] | torch.Tensor,
    alpha: float = 1.0,
) -> torch.Tensor:
    """``out += alpha · Σ_k c_k A_k B_kᵀ`` in place, never forming a whole tangent (one
    ``addmm_`` of inner size K·r into ``out`` viewed as m × n; ``addr_`` when K·r = 1)."""
    left, right = combined(factors, coefficients)
    if not out.is_contiguous():  # a view as m × n would be a copy: add the product instead
        return out.add_(torch.mm(left, right.T).view(out.shape), alpha=alpha)
    matrix = out.view(left.shape[0], right.shape[0])
    if left.shape[1] == 1:
        matrix.addr_(left[:, 0], right[:, 0], alpha=alpha)
    else:
        matrix.addmm_(left, right.T, alpha=alpha)
    return out


def write_combination(
    out: torch.Tensor, factors: Factors, coefficients: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """``out ← Σ_k c_k A_k B_kᵀ`` (contiguous ``out``), one matrix product written in place
    (``addr_`` ignoring what ``out`` held when K·r = 1)."""
    left, right = combined(factors, coefficients)
    matrix = out.view(left.shape[0], right.shape[0])
    if left.shape[1] == 1:
        matrix.addr_(left[:, 0], right[:, 0], beta=0)
    else:
        torch.mm(left, right.T, out=matrix)
    return out


def structured_tangents(
    like: torch.Tensor, count: int, distribution: str, seed: int, index: int, rank: int | None
) -> torch.Tensor:
    """Parameter ``index``'s K tangents, whole: A_k B_kᵀ if it is structured at ``rank``, else
    the dense ``streams.parameter_tangents``."""
    if not is_structured(like, rank):
        return parameter_tangents(like, count, distribution, seed, index)
    return materialise(parameter_factors(like, count, distribution, seed, index, rank), like.shape)
