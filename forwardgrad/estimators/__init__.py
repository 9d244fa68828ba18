"""Gradient estimators: forward gradient, activity-perturbed forward gradient, zeroth-order (SPSA)
and exact backprop, one protocol.

Two layers:

- Functional: ``forward_grad(fn, params, ...)``, ``zeroth_order_grad``, ``backprop_grad`` take a
  function of a dict of tensors and return ``(value, grads)``, like ``torch.func``.
- Module: ``ForwardGradient``, ``ActivityPerturbation``, ``ZerothOrder``, ``Backprop`` share
  ``loss = est.estimate(model, closure)``; it overwrites ``.grad`` of every trainable parameter
  with the estimate, so any ``torch.optim`` optimizer applies the step.

``LocalLosses`` wraps a sequential network into blocks with auxiliary heads and local losses;
every module estimator above trains it (``tables`` says what closures may return).

``ESTIMATORS`` maps each name to its class; ``make_estimator(name, **options)`` builds one and
passes it the options it takes (the command line, the report and the benchmark all use it).
"""

from __future__ import annotations

from forwardgrad.errors import ConfigurationError, EstimatorError
from forwardgrad.estimators.activity import ActivityPerturbation
from forwardgrad.estimators.backprop import Backprop, backprop_grad
from forwardgrad.estimators.base import Estimator, Reducer, Seeded
from forwardgrad.estimators.forward import ForwardGradient, forward_grad
from forwardgrad.estimators.local_losses import LocalLosses
from forwardgrad.estimators.zeroth_order import ZerothOrder, zeroth_order_grad

ESTIMATORS: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (ForwardGradient, ZerothOrder, Backprop)
}


def make_estimator(name: str, **options) -> Estimator:
    """Build the estimator registered as ``name`` with the ``options`` it takes.

    Options an estimator does not take are ignored (``tangents`` means nothing to backprop), so
    that a caller can pass the same settings to every estimator it compares.
    """
    cls = ESTIMATORS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigurationError(
            f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}."
        )
    return cls(**{k: v for k, v in options.items() if k in cls.options})


__all__ = [
    "ESTIMATORS",
    "ActivityPerturbation",
    "Backprop",
    "ConfigurationError",
    "Estimator",
    "EstimatorError",
    "ForwardGradient",
    "LocalLosses",
    "Reducer",
    "Seeded",
    "ZerothOrder",
    "backprop_grad",
    "forward_grad",
    "make_estimator",
    "zeroth_order_grad",
]
