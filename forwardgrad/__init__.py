"""forwardgrad: gradients without backpropagation, for PyTorch.

Forward-gradient estimators on forward-mode AD (Baydin et al. 2022), with zeroth-order (SPSA)
and exact backprop behind the same interface: ``loss = est.estimate(model, closure)`` fills
``.grad`` and any ``torch.optim`` optimizer applies the step.
"""

from forwardgrad.estimators import (
    ESTIMATORS,
    Backprop,
    Estimator,
    EstimatorError,
    ForwardGradient,
    ZerothOrder,
    backprop_grad,
    forward_grad,
    make_estimator,
    zeroth_order_grad,
)
from forwardgrad.tangents import COMBINERS, DISTRIBUTIONS, combine, sample_tangents

__version__ = "0.1.0"

__all__ = [
    "COMBINERS",
    "DISTRIBUTIONS",
    "ESTIMATORS",
    "Backprop",
    "Estimator",
    "EstimatorError",
    "ForwardGradient",
    "ZerothOrder",
    "backprop_grad",
    "combine",
    "forward_grad",
    "make_estimator",
    "sample_tangents",
    "zeroth_order_grad",
    "__version__",
]
