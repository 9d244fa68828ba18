"""forwardgrad: gradients without backpropagation, for PyTorch.

Forward-gradient estimators on forward-mode AD (Baydin et al. 2022), with zeroth-order (SPSA)
and exact backprop behind the same interface: ``loss = est.estimate(model, closure)`` fills
``.grad`` and any ``torch.optim`` optimizer applies the step.
"""

from forwardgrad.errors import (
    ConfigurationError,
    EstimatorError,
    ForwardGradError,
    NonFiniteLoss,
    UnsupportedOperation,
)
from forwardgrad.estimators import (
    ESTIMATORS,
    ActivityPerturbation,
    Backprop,
    Estimator,
    ForwardGradient,
    LocalLosses,
    ZerothOrder,
    backprop_grad,
    forward_grad,
    make_estimator,
    zeroth_order_grad,
)
from forwardgrad.jvp import Directional, FallbackWarning, directional_derivatives
from forwardgrad.optim.constraints import (
    Constraint,
    KSparsePolytope,
    L1Ball,
    L2Ball,
    LinfBall,
    NuclearBall,
    Simplex,
    parse_constraint,
)
from forwardgrad.optim.forward_sgd import ForwardSGD
from forwardgrad.optim.frank_wolfe import FrankWolfe
from forwardgrad.tangents import COMBINERS, DISTRIBUTIONS, combine, sample_tangents

__version__ = "0.1.0"

__all__ = [
    "COMBINERS",
    "DISTRIBUTIONS",
    "ESTIMATORS",
    "ActivityPerturbation",
    "Backprop",
    "ConfigurationError",
    "Directional",
    "FallbackWarning",
    "ForwardGradError",
    "NonFiniteLoss",
    "UnsupportedOperation",
    "directional_derivatives",
    "Constraint",
    "Estimator",
    "EstimatorError",
    "ForwardGradient",
    "ForwardSGD",
    "FrankWolfe",
    "KSparsePolytope",
    "LocalLosses",
    "L1Ball",
    "L2Ball",
    "LinfBall",
    "NuclearBall",
    "Simplex",
    "ZerothOrder",
    "backprop_grad",
    "combine",
    "forward_grad",
    "make_estimator",
    "parse_constraint",
    "sample_tangents",
    "zeroth_order_grad",
    "__version__",
]
