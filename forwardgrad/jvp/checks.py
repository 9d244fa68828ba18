"""Checks shared by both derivative paths: what the closure returned, whether the two paths
agree, and PyTorch's errors turned into sentences that say what to do."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator

import torch

from forwardgrad.errors import EstimatorError, UnsupportedOperation

_NO_FORWARD_AD = re.compile(r"forward AD with (?:aten::)?([\w.]+)")
_CUSTOM_FUNCTION_WITHOUT_JVP = "implement the jvp function for custom autograd.Function"
BACKWARD_CALLED = ("does not require grad", "backward through the graph a second time")


def as_tensor(value: object) -> torch.Tensor:
    """``value`` if it is a floating-point tensor, else a TypeError that says what to return."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"the closure returned {type(value).__name__}, not a tensor; return the loss tensor "
            "computed with the model."
        )
    if not (value.is_floating_point() or value.is_complex()):
        raise TypeError(f"the loss has dtype {value.dtype}; it must be a floating-point tensor.")
    return value


def check_value(value: object, vector: bool = False, detach: bool = True) -> torch.Tensor:
    """The closure's value (detached unless asked): a scalar, or with ``vector`` a 1-D vector."""
    value = as_tensor(value)
    if vector:
        if value.dim() != 1:
            raise ValueError(
                f"the closure must return a vector of losses (one dimension), got shape "
                f"{tuple(value.shape)}; return e.g. F.cross_entropy(..., reduction='none')."
            )
        return value.detach() if detach else value
    if value.numel() != 1:
        raise ValueError(
            f"the loss must be a scalar, got shape {tuple(value.shape)}; reduce it first, e.g. "
            "loss.mean() or loss.sum()."
        )
    return (value.detach() if detach else value).reshape(())


def agree(derivatives: torch.Tensor, reference: torch.Tensor) -> bool:
    """Do the fast path's derivatives match the general path's to the dtype's precision?

    Both are sums of many products rounded differently, so the tolerance scales with the
    largest derivative: 1e-3 of it in float32, 1e-5 in float64 (a float64 model is only
    float32-exact where PyTorch's formulas use float32 constants, or a library computes a softmax
    or a norm in float32). This comparison catches what the stacked evaluation cannot see at all
    (TorchScript, C++ extensions), which is far off; small errors of a rule are caught by
    ``jvp.rule_check``, which checks each rule alone in float64.
    """
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    rtol = 1e-5 if reference.dtype == torch.float64 else 1e-3
    error = float((derivatives - reference).abs().max()) if reference.numel() else 0.0
    return error <= rtol * scale + torch.finfo(reference.dtype).tiny


def disagreement(derivatives: torch.Tensor, reference: torch.Tensor) -> str:
    error = float((derivatives - reference).abs().max())
    scale = float(reference.abs().max())
    return (
        f"its derivatives differ from PyTorch's forward-mode AD by {error:.3g} (of {scale:.3g}), "
        "which is what an operation the stacked evaluation cannot see leaves behind (TorchScript, "
        "a C++ extension)"
    )


@contextlib.contextmanager
def backward_not_called() -> Iterator[None]:
    """PyTorch's error for a closure that called ``backward()`` itself, as one sentence."""
    try:
        yield
    except RuntimeError as error:
        if any(s in str(error) for s in BACKWARD_CALLED):
            raise EstimatorError(
                "the closure called backward(); estimators compute the gradient themselves, "
                "so return the loss without calling backward."
            ) from None
        raise


def guarded(closure: Callable[[], object]) -> Callable[[], object]:
    """The closure, with a clear error if it calls ``backward()`` itself."""

    def call():
        with backward_not_called():
            return closure()

    return call


def unsupported_operation(error: RuntimeError, where: str | None) -> EstimatorError | None:
    """PyTorch's 'no forward-mode formula' error as one sentence, or None for other errors."""
    place = f" in module {where}" if where else ""
    if _CUSTOM_FUNCTION_WITHOUT_JVP in str(error):
        return UnsupportedOperation(
            f"a custom torch.autograd.Function{place} has no jvp (forward-mode derivative); "
            "give it a jvp staticmethod, or use the Backprop or ZerothOrder estimator."
        )
    match = _NO_FORWARD_AD.search(str(error))
    if match is None:
        return None
    return UnsupportedOperation(
        f"PyTorch has no forward-mode derivative for the operation '{match.group(1)}'{place}; "
        "replace it with an equivalent built from supported operations (or a custom "
        "torch.autograd.Function with a jvp), or use the Backprop or ZerothOrder estimator."
    )
