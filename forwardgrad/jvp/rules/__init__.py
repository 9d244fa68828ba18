"""Stacked-tangent rules, one module per family of operations; importing this package registers
them all in ``registry.RULES`` (see ``registry`` for how a rule is written and tested)."""

from forwardgrad.jvp.rules import elementwise, linear, losses, normalization, pooling, shape
from forwardgrad.jvp.rules.registry import IN_PLACE, REGISTERED, RULES, Decline, Rule

__all__ = [
    "IN_PLACE",
    "REGISTERED",
    "RULES",
    "Decline",
    "Rule",
    "elementwise",
    "linear",
    "losses",
    "normalization",
    "pooling",
    "shape",
]
