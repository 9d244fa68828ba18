"""Tangents: random directions in parameter space, and how K of them become one estimate.

A *tangent* is a random direction v with zero-mean components and E[v vᵀ] = I, so that the
forward gradient (∇f·v) v is an unbiased estimate of ∇f (Baydin et al. 2022, "Gradients
without Backpropagation"). This package holds the distributions (a registry), the seeded
per-parameter streams they are drawn from, the structured (low-rank) tangents of weight matrices,
the sources the derivative engine asks for a parameter's tangents, and the combiners that turn K
directional derivatives into an estimate.
"""

from forwardgrad.seeds import draw_seed
from forwardgrad.tangents.combiners import (
    COMBINERS,
    check_combine,
    combine,
    combine_tangents,
    gram_matrix,
    mean_coefficients,
    projection_coefficients,
)
from forwardgrad.tangents.distributions import (
    DISTRIBUTIONS,
    STREAMABLE,
    Distribution,
    check_count,
    check_distribution,
)
from forwardgrad.tangents.sources import (
    DrawnTangents,
    GivenTangents,
    GradTangents,
    HeldTangents,
    StreamedSource,
    TangentSource,
)
from forwardgrad.tangents.streams import (
    CHUNK,
    fill_tangent,
    parameter_row_blocks,
    parameter_tangents,
    sample_tangents,
)
from forwardgrad.tangents.structured import (
    check_rank,
    check_structured,
    is_structured,
    parameter_factors,
)

__all__ = [
    "CHUNK",
    "COMBINERS",
    "DISTRIBUTIONS",
    "STREAMABLE",
    "Distribution",
    "DrawnTangents",
    "GivenTangents",
    "GradTangents",
    "HeldTangents",
    "StreamedSource",
    "TangentSource",
    "check_combine",
    "check_count",
    "check_distribution",
    "check_rank",
    "check_structured",
    "combine",
    "combine_tangents",
    "draw_seed",
    "fill_tangent",
    "gram_matrix",
    "is_structured",
    "mean_coefficients",
    "parameter_factors",
    "parameter_row_blocks",
    "parameter_tangents",
    "projection_coefficients",
    "sample_tangents",
]
