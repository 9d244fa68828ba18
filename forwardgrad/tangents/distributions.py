"""Tangent distributions: the laws a random direction v is drawn from, as a registry of objects.

Every distribution here has zero-mean components with E[v vᵀ] = I over the flattened
parameters, so that the forward gradient (∇f·v) v is an unbiased estimate of ∇f.

- ``normal``: v ~ N(0, I). For one tangent E‖g‖² = (n + 2)‖∇f‖² (n parameters).
- ``rademacher``: independent ±1 signs. E‖g‖² = n‖∇f‖², the smallest second moment of any law
  with independent unit-variance components.
- ``orthogonal``: v_k = √n q_k with q_1..q_K orthonormal and Haar-distributed (K <= n). Its K
  directions are coupled across all parameters, so it cannot be drawn one parameter at a time.

A *streamable* distribution draws each parameter's tangents alone, as a pure function of the
step's seed, the parameter's index and the tangent's number (see ``tangents.streams``): the
memory-lean paths draw a parameter's tangent just before its layer runs and again for the
update instead of holding it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from forwardgrad.errors import ConfigurationError


@dataclass(frozen=True)
class Distribution:
    """A tangent law, known by ``name``.

    Attributes:
        name: how the command line and ``ForwardGradient(distribution=...)`` call it.
        streamable: each parameter's tangent can be drawn alone from (seed, index, k).
        second_moment_excess: c in E‖(∇f·v) v‖² = (n + c)‖∇f‖² for one tangent (n parameters).
        summary: one line for help texts and reports.
    """

    name: str
    streamable: bool
    second_moment_excess: float | None
    summary: str


NORMAL = Distribution("normal", True, 2.0, "v ~ N(0, I)")
RADEMACHER = Distribution("rademacher", True, 0.0, "independent ±1 signs")
ORTHOGONAL = Distribution(
    "orthogonal", False, None, "√n times K orthonormal Haar directions (K <= n)"
)

DISTRIBUTIONS: dict[str, Distribution] = {d.name: d for d in (NORMAL, RADEMACHER, ORTHOGONAL)}
STREAMABLE = tuple(name for name, d in DISTRIBUTIONS.items() if d.streamable)


def check_distribution(distribution: str, allowed: Iterable[str] = DISTRIBUTIONS) -> str:
    """Return ``distribution`` if it names one of ``allowed``, else raise an error listing them."""
    allowed = tuple(allowed)
    if not isinstance(distribution, str) or distribution not in allowed:
        raise ConfigurationError(
            f"unknown tangent distribution {distribution!r}; choose one of {', '.join(allowed)}."
        )
    return distribution


def check_count(tangents: int) -> int:
    """Return the number of tangents if it is a positive integer, else raise."""
    if isinstance(tangents, bool) or not isinstance(tangents, int) or tangents < 1:
        raise ConfigurationError(
            f"tangents must be a positive integer (1, 2, ...), got {tangents!r}."
        )
    return tangents
