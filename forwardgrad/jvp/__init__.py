"""The derivative engine: directional derivatives of a closure by forward-mode AD.

``directional_derivatives(model, closure, source)`` is the one entry point; see ``engine``.
``stacked`` is the fast path (one evaluation, K tangents stacked), ``general`` the dual-tensor
path, ``rules`` the stacked-tangent rules, ``routes`` the ways around operations without a
forward-mode formula.
"""

from forwardgrad.jvp.engine import (
    FAST,
    GENERAL,
    Directional,
    FallbackWarning,
    directional_derivatives,
    model_path,
)

__all__ = [
    "FAST",
    "GENERAL",
    "Directional",
    "FallbackWarning",
    "directional_derivatives",
    "model_path",
]
