"""Rules for elementwise operations: activations, arithmetic and dropout.

An elementwise y = f(x) has ẏ = f'(x) ẋ; a binary one adds the terms of both operands, each
broadcast the way the primal was. The K tangents ride along as a leading dimension.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from forwardgrad.jvp.rules.registry import Decline, add_terms, arg, lift, randn, rule


def _unary_samples(dtype):
    yield (randn(3, 4, dtype=dtype),), {}


def _positive_samples(dtype):
    yield (randn(3, 4, dtype=dtype, positive=True),), {}


def scaled(name: str, formula: str, derivative: Callable, samples=_unary_samples, **options):
    """Register ``name`` as y = f(x) with ẏ = f'(x) ẋ, f' = ``derivative(x, y, *args)``."""

    def apply(mode, func, x, *args, **kwargs):
        tx = mode.tangent(x)
        out = func(x, *args, **kwargs)
        tangent = lift(tx, out.dim()) * derivative(x, out, *args, **kwargs)
        return mode.track(out, tangent, fresh=True)

    apply.__doc__ = formula
    apply.__name__ = name
    return rule(name, samples=samples, **options)(apply)


scaled("tanh", "y = tanh x:  ẏ = (1 − y²) ẋ", lambda x, y: 1 - y * y)
scaled("sigmoid", "y = σ(x):  ẏ = y (1 − y) ẋ", lambda x, y: y * (1 - y))
scaled("exp", "y = eˣ:  ẏ = y ẋ", lambda x, y: y)
scaled("log", "y = log x:  ẏ = ẋ / x", lambda x, y: 1 / x, samples=_positive_samples)
scaled("sqrt", "y = √x:  ẏ = ẋ / (2y)", lambda x, y: 0.5 / y, samples=_positive_samples)
scaled("rsqrt", "y = 1/√x:  ẏ = −y³ ẋ / 2", lambda x, y: -0.5 * y**3, samples=_positive_samples)


def _gelu_derivative(x, y, approximate="none"):
    if approximate == "tanh":  # 0.5 x (1 + tanh u), u = √(2/π) (x + 0.044715 x³)
        c = math.sqrt(2 / math.pi)
        t = torch.tanh(c * (x + 0.044715 * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
    if approximate != "none":
        raise Decline(f"gelu approximate={approximate!r}")
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    return cdf + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _gelu_samples(dtype):
    yield (randn(3, 4, dtype=dtype),), {}
    yield (randn(3, 4, dtype=dtype),), {"approximate": "tanh"}


scaled(
    "gelu",
    "y = x Φ(x):  ẏ = (Φ(x) + x φ(x)) ẋ (tanh form: its own derivative)",
    _gelu_derivative,
    samples=_gelu_samples,
    owners=(F,),
)


def _silu_derivative(x, y, inplace=False):
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


scaled("silu", "y = x σ(x):  ẏ = σ(x) (1 + x (1 − σ(x))) ẋ", _silu_derivative, owners=(F,))


def _leaky_relu_derivative(x, y, negative_slope=0.01, inplace=False):
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return torch.where(x > 0, one, one * negative_slope)


def _leaky_samples(dtype):
    yield (randn(3, 4, dtype=dtype),), {}
    yield (randn(3, 4, dtype=dtype), 0.2), {}


scaled(
    "leaky_relu",
    "y = max(x, a x):  ẏ = (1 if x > 0 else a) ẋ",
    _leaky_relu_derivative,
    samples=_leaky_samples,
    owners=(torch, F),
)


def _hardtanh_derivative(x, y, min_val=-1.0, max_val=1.0, inplace=False):
    return ((x > min_val) & (x < max_val)).to(x.dtype)


def _hardtanh_samples(dtype):
    yield (randn(3, 4, dtype=dtype) * 2,), {}
    yield (randn(3, 4, dtype=dtype) * 4, 0.0, 6.0), {}


scaled(
    "hardtanh",
    "y = clamp(x, lo, hi):  ẏ = ẋ where lo < x < hi, else 0",
    _hardtanh_derivative,
    samples=_hardtanh_samples,
    owners=(F,),
)


def _hardswish_derivative(x, y, inplace=False):
    middle = (x > -3) & (x < 3)
    return torch.where(middle, (2 * x + 3) / 6, (x >= 3).to(x.dtype))


scaled(
    "hardswish",
    "y = x relu6(x + 3)/6:  ẏ = ((2x + 3)/6 inside (−3, 3), 1 above, 0 below) ẋ",
    _hardswish_derivative,
    samples=lambda dtype: [((randn(3, 4, dtype=dtype) * 4,), {})],
    owners=(F,),
)


def _hardsigmoid_derivative(x, y, inplace=False):
    return ((x > -3) & (x < 3)).to(x.dtype) / 6


scaled(
    "hardsigmoid",
    "y = relu6(x + 3)/6:  ẏ = ẋ/6 inside (−3, 3), else 0",
    _hardsigmoid_derivative,
    samples=lambda dtype: [((randn(3, 4, dtype=dtype) * 4,), {})],
    owners=(F,),
)


# --------------------------------------------------------------------------------------------
# relu: ẏ = ẋ where y > 0, written over ẋ when nothing else reads it

_IN_PLACE_RELU = (torch.relu_, torch.Tensor.relu_, F.relu_)


def _relu_samples(dtype):
    yield (randn(3, 4, dtype=dtype),), {}


@rule("relu", samples=_relu_samples, functions=_IN_PLACE_RELU, in_place=True)
def relu(mode, func, x, *args, **kwargs):
    """y = max(x, 0):  ẏ = ẋ where y > 0, else 0 (relu's own backward kernel, over K)."""
    inplace = func in _IN_PLACE_RELU or bool(arg(args, kwargs, 0, "inplace", False))
    tx = mode.tangent(x)
    if inplace:
        if mode.is_parameter(x) or x._is_view() or mode.shares_storage(x):
            raise Decline("in-place relu on a view or a parameter")
        out = torch.relu_(x)
    else:
        out = torch.relu(x)
    # Written over ẋ only when no other tensor shares ẋ (h - c shares h's); x's tangent is then
    # gone, and reading it again makes the caller run the closure once more without this.
    if mode.reusable(x, tx):
        torch.ops.aten.threshold_backward.grad_input(tx, out, 0, grad_input=tx)
        if out is not x:
            mode.mark_reused(x)
        return mode.track(out, tx, fresh=True)
    tangent = torch.ops.aten.threshold_backward(tx, out, 0)
    return mode.track(out, tangent, fresh=True)


# --------------------------------------------------------------------------------------------
# Arithmetic


def _binary_samples(dtype):
    a, b = randn(3, 4, dtype=dtype), randn(3, 4, dtype=dtype, positive=True)
    yield (a, b), {}
    yield (a, randn(4, dtype=dtype, positive=True)), {}
    yield (a, 2.5), {}


def _add_samples(dtype):
    yield from _binary_samples(dtype)
    yield (randn(3, 4, dtype=dtype), randn(3, 4, dtype=dtype)), {"alpha": 0.5}


def _add_or_sub(sign: float, doc: str):
    def apply(mode, func, a, b, *args, **kwargs):
        out = func(a, b, *args, **kwargs)
        alpha = arg(args, kwargs, 0, "alpha", 1)
        ta, tb = mode.tangent(a), mode.tangent(b)
        tangent = None if ta is None else lift(ta, out.dim())
        if tb is not None:
            term = lift(tb, out.dim()) * (sign * alpha)
            tangent = term if tangent is None else tangent + term
        return mode.track(out, tangent, fresh=tb is not None)

    apply.__doc__ = doc
    return apply


rule("add", operator="add", reflected=True, samples=_add_samples)(
    _add_or_sub(1.0, "y = a + α b:  ẏ = ȧ + α ḃ")
)
rule("sub", "subtract", operator="sub", reflected=True, samples=_add_samples)(
    _add_or_sub(-1.0, "y = a − α b:  ẏ = ȧ − α ḃ")
)


@rule("mul", "multiply", operator="mul", reflected=True, samples=_binary_samples)
def mul(mode, func, a, b):
    """y = a b:  ẏ = ȧ b + a ḃ."""
    out = func(a, b)
    ta, tb = mode.tangent(a), mode.tangent(b)
    tangent = None if ta is None else lift(ta, out.dim()) * b
    if tb is not None:
        tangent = add_terms(tangent, a * lift(tb, out.dim()))
    return mode.track(out, tangent)


@rule("div", "divide", "true_divide", operator="truediv", reflected=True, samples=_binary_samples)
def div(mode, func, a, b, *args, **kwargs):
    """y = a / b:  ẏ = ȧ / b − y ḃ / b."""
    if arg(args, kwargs, 0, "rounding_mode") is not None:
        raise Decline("division with rounding")
    out = func(a, b, *args, **kwargs)
    ta, tb = mode.tangent(a), mode.tangent(b)
    tangent = None if ta is None else lift(ta, out.dim()) / b
    if tb is not None:
        tangent = add_terms(tangent, -out / b * lift(tb, out.dim()))
    return mode.track(out, tangent)


@rule("neg", "negative", operator="neg", samples=_unary_samples)
def neg(mode, func, x):
    """y = −x:  ẏ = −ẋ."""
    return mode.track(func(x), -mode.tangent(x))


def _pow_samples(dtype):
    yield (randn(3, 4, dtype=dtype, positive=True), 3), {}
    yield (randn(3, 4, dtype=dtype, positive=True), 0.5), {}


@rule("pow", operator="pow", samples=_pow_samples)
def pow_(mode, func, x, exponent):
    """y = xᵖ (constant p):  ẏ = p xᵖ⁻¹ ẋ."""
    if isinstance(exponent, torch.Tensor) or mode.tangent(x) is None:
        raise Decline("pow with a tensor exponent")
    out = func(x, exponent)
    return mode.track(out, mode.tangent(x) * (exponent * x.pow(exponent - 1)))


# --------------------------------------------------------------------------------------------
# Dropout: the mask ATen would draw, shared by the value and every tangent


def _dropout_samples(dtype):
    yield (randn(3, 4, dtype=dtype), 0.0), {}
    yield (randn(3, 4, dtype=dtype), 0.5, False), {}
    yield (randn(30, 40, dtype=dtype), 0.3), {}  # the test seeds both evaluations alike


@rule("dropout", samples=_dropout_samples, owners=(F,))
def dropout(mode, func, x, p=0.5, training=True, inplace=False):
    """y = x m / (1 − p), m ~ Bernoulli(1 − p):  ẏ = ẋ m / (1 − p), the same mask for every k."""
    tx = mode.tangent(x)
    if inplace:
        raise Decline("in-place dropout")
    if not training or p == 0:
        return mode.track(func(x, p, training), tx)
    if x.device.type != "cpu" or p == 1:  # elsewhere ATen draws the mask differently
        raise Decline("dropout off the CPU")
    noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
    return mode.track(x * noise, lift(tx, x.dim()) * noise)
