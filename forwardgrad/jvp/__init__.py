"""The derivative engine: directional derivatives of a closure by forward-mode AD.

``directional_derivatives(model, closure, source)`` is the one entry point; see ``engine``.
``stacked`` is the fast path (one evaluation, K tangents stacked), ``general`` the dual-tensor
path, ``rules`` the stacked-tangent rules, ``inject`` the hook that adds a tangent at an
activation (``add_tangent``), ``routes`` the ways around operations without a
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
from forwardgrad.jvp.inject import add_tangent, tangent_count

__all__ = [
    "FAST",
    "GENERAL",
    "Directional",
    "FallbackWarning",
    "add_tangent",
    "directional_derivatives",
    "model_path",
    "tangent_count",
]
