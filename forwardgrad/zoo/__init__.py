"""A zoo of real architectures for testing and measuring forward gradients.

Application-level (the library core never imports it). Each ``ZooCase`` in ``CASES`` builds a
model with random weights and a fixed batch (``case.instantiate(size, dtype, seed)``) and
computes its training loss; ``forwardgrad.zoo.harness`` checks the forward gradient on it
against autograd and times it against backprop. ``python -m forwardgrad.zoo`` prints the table.
"""

from forwardgrad.zoo import convnets, hf, sequence, vision  # noqa: F401  (they register cases)
from forwardgrad.zoo.registry import CASES, SIZES, ZooCase, ZooInstance, get_case

__all__ = ["CASES", "SIZES", "ZooCase", "ZooInstance", "get_case"]
