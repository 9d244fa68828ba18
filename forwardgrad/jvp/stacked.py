"""Fast forward gradients: the loss evaluated once, the K tangents stacked as a batch dimension.

The general path (``estimators.directional_derivatives_of``) runs the closure on dual tensors,
once per tangent or through legacy vmap. Here the closure runs once, under a
``TorchFunctionMode`` that keeps, beside every tensor computed from the parameters, its K
tangents as one tensor of shape ``(K, *shape)``, and pushes them through each operation by
that operation's Jacobian-vector product. For a linear layer y = x Wᵀ + b:

    ẏ_k = ẋ_k Wᵀ + x V_kᵀ + v_k,

one matrix product with K·B rows and one with the K weight tangents, while the primal y is
computed once. A parameter's tangent is asked for (``tangent_of(i)``) when the first operation
that uses it runs, so a caller can draw it then, and drop it or draw it again later (see
``TangentSource``); intermediate tangents die with their activations.

Only operations with a rule below are covered: linear and convolution layers, the common
activations, pooling, shape changes, elementwise arithmetic, dropout, batch and layer norm,
embeddings, reductions and the usual losses. Any other operation that touches a tangent
raises ``Unsupported`` before it runs, and the caller falls back to the general path.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from forwardgrad import tangents as tg

DISTRIBUTIONS = ("normal", "rademacher")  # tangents that a parameter can draw on its own


class Unsupported(RuntimeError):
    """An operation on the parameters' tangents has no rule here; use the general path."""


class TangentReused(Unsupported):
    """A tensor's tangent was read after relu had reused it in place for its output."""


# ---------------------------------------------------------------------------------------------
# Where parameter tangents come from


class TangentSource:
    """Tangent i of one step, a pure function of ``(seed, i)`` (``tangents.parameter_tangents``).

    The three subclasses differ in what they keep: ``GradTangents`` (K = 1) draws straight
    into ``.grad``, ``HeldTangents`` keeps each ``(K, *shape)`` tensor for the update, and
    ``DrawnTangents`` keeps nothing and draws again when asked again.
    """

    def __init__(
        self, params: Sequence[torch.Tensor], count: int, distribution: str, seed: int
    ) -> None:
        self.params, self.count = list(params), count
        self.distribution, self.seed = distribution, seed

    def __call__(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def draw(self, index: int) -> torch.Tensor:
        return tg.parameter_tangents(
            self.params[index], self.count, self.distribution, self.seed, index
        )

    def gram(self) -> torch.Tensor:
        """BᵀB over all parameters (K x K, float64), for the projection combiner."""
        return tg.gram_matrix([self(i) for i in range(len(self.params))])


class DrawnTangents(TangentSource):
    """Keeps no tangent: each request draws it again. A linear layer's weight or an embedding
    table larger than ``tangents.CHUNK`` is drawn a block of rows at a time (``row_blocks``),
    so that the step never holds more of a tangent than one block."""

    def __call__(self, index: int) -> torch.Tensor:
        return self.draw(index)

    def row_blocks(self, index: int) -> Iterator[tuple[int, int, torch.Tensor]] | None:
        """``(start, stop, tangents[:, start:stop])`` in row order, or ``None`` for a small
        parameter, which is cheaper drawn whole."""
        p = self.params[index]
        if p.dim() < 2 or p.numel() <= tg.CHUNK:
            return None
        return tg.parameter_row_blocks(p, self.count, self.distribution, self.seed, index)


class HeldTangents(TangentSource):
    """Draws each parameter's K tangents once and keeps them for the update.

    ``buffers`` (index -> tensor), kept by the caller from step to step, are drawn into when
    their shape fits: fresh multi-megabyte tensors cost a page fault per 4 KiB at first touch.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        count: int,
        distribution: str,
        seed: int,
        buffers: dict[int, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(params, count, distribution, seed)
        self.held: dict[int, torch.Tensor] = {}
        self.buffers = {} if buffers is None else buffers

    def __call__(self, index: int) -> torch.Tensor:
        if index not in self.held:
            p, buffer = self.params[index], self.buffers.get(index)
            shape = (self.count, *p.shape)
            if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != (
                shape,
                p.dtype,
                p.device,
            ):
                buffer = self.buffers[index] = torch.empty(shape, dtype=p.dtype, device=p.device)
            for k in range(self.count):
                tg.fill_tangent(buffer[k], self.distribution, self.seed, index, k)
            self.held[index] = buffer
        return self.held[index]

    def write_grads(self, coefficients: torch.Tensor) -> None:
        """``.grad`` of parameter i ← Σ_k c_k v_k."""
        for i, p in enumerate(self.params):
            v = self(i)
            c = coefficients.to(device=v.device, dtype=v.dtype)
            estimate = torch.tensordot(c, v, dims=1).to(p.device)
            if _grad_buffer_ok(p):
                p.grad.copy_(estimate)
            else:
                p.grad = estimate


class GradTangents(TangentSource):
    """K = 1: each tangent is drawn into the parameter's ``.grad``, then scaled there by the
    coefficient, so the step holds no tangent beside the gradient it has to fill anyway."""

    def __init__(self, params: Sequence[torch.Tensor], distribution: str, seed: int) -> None:
        super().__init__(params, 1, distribution, seed)
        self.drawn: set[int] = set()

    def __call__(self, index: int) -> torch.Tensor:
        p = self.params[index]
        if not _grad_buffer_ok(p):
            p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
        if index not in self.drawn:
            tg.fill_tangent(p.grad, self.distribution, self.seed, index, 0)
            self.drawn.add(index)
        return p.grad.unsqueeze(0)

    def write_grads(self, coefficients: torch.Tensor) -> None:
        """``.grad`` ← c v, in place (parameters the loss never used get their v drawn now)."""
        scale = float(coefficients.reshape(-1)[0])
        for i in range(len(self.params)):
            self(i)[0].mul_(scale)


def _grad_buffer_ok(p: torch.Tensor) -> bool:
    g = p.grad
    return (
        g is not None
        and g.shape == p.shape
        and g.dtype == p.dtype
        and g.device == p.device
        and g.is_contiguous()
    )


# ---------------------------------------------------------------------------------------------
# The evaluation


def stacked_derivatives(
    closure: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    tangent_of: Callable[[int], torch.Tensor],
    count: int,
    rewind: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``closure`` once and return its value and its K directional derivatives.

    Call it under ``torch.no_grad()``. Parameter i moves along ``tangent_of(i)``, a tensor of
    shape ``(K, *params[i].shape)``; the result is d_k = Σ_i ∇_i L · tangent_of(i)[k].

    Args:
      closure: computes the scalar loss from the parameters, which it uses in place.
      params: the parameters that carry tangents.
      tangent_of: the K tangents of parameter i, asked for when an operation first uses it.
      count: K.
      rewind: puts back what running the closure changed (buffers, RNG states). Given it, relu
        writes its output's tangent over its input's, one activation-sized tensor less at
        the peak; if the closure then reads the input's tangent again (``h`` in
        ``relu(h) + h``), everything is rewound and the closure runs again without that, as
        it does from then on for these parameters.

    Returns:
      ``(value, derivatives)``: what the closure returned, and a tensor of shape ``(K,)``.

    Raises:
      Unsupported: the closure used an operation on a tangent-carrying tensor that has no
        rule here; nothing has been applied to it.
    """
    if rewind is None or not params or params[0] in _KEEPS_RELU_INPUTS:
        return _stacked_derivatives(closure, params, tangent_of, count, reuse=False)
    try:
        return _stacked_derivatives(closure, params, tangent_of, count, reuse=True)
    except TangentReused:
        _KEEPS_RELU_INPUTS[params[0]] = True
        rewind()
    return _stacked_derivatives(closure, params, tangent_of, count, reuse=False)


# Models, known by their first parameter, whose closure reads a relu input's tangent after
# the relu: there relu keeps its input's tangent and writes a new one.
_KEEPS_RELU_INPUTS = WeakIdKeyDictionary()


def _stacked_derivatives(closure, params, tangent_of, count, reuse):
    mode = StackedTangents(params, tangent_of, count, reuse)
    mode.boundary = sys._getframe()
    with mode:
        value = closure()
        tangent = mode.tangent(value) if isinstance(value, torch.Tensor) else None
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        return value, tangent  # not a scalar loss: the caller says what is wrong
    if tangent is None:  # the loss does not depend on the parameters
        tangent = torch.zeros(count, *value.shape, dtype=value.dtype, device=value.device)
    return value, tangent.reshape(count)


class StackedTangents(TorchFunctionMode):
    """Carries K tangents beside each tensor computed from ``params``; see the module doc."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        tangent_of: Callable[[int], torch.Tensor],
        count: int,
        reuse: bool = False,
    ) -> None:
        super().__init__()
        self.count = count
        self.reuse = reuse  # may relu overwrite a tangent that only its input holds?
        self._params = list(params)
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._tangent_of = tangent_of
        self._row_blocks = getattr(tangent_of, "row_blocks", None)
        self._tangents = WeakIdKeyDictionary()
        # Tensors whose tangent a rule allocated for them alone (not a view of another
        # tensor's, nor a parameter's tangent, which may be its .grad).
        self._owns = WeakIdKeyDictionary()
        # Storages of the parameter tangents handed out, never to be written (.grad, held
        # tangents): pointer -> a weak reference to the tensor that owns it, so that a freed
        # drawn tangent's address, reused by a later activation, does not count.
        self._parameter_storages: dict[int, weakref.ref] = {}
        self.boundary = None  # the frame that runs the closure: where the stack search stops

    def tangent(self, value: object) -> torch.Tensor | None:
        """The ``(K, *shape)`` tangent of ``value``, or ``None`` if it is a constant."""
        if not isinstance(value, torch.Tensor):
            return None
        index = self._index.get(id(value))
        if index is not None:
            tangent = self._tangent_of(index)
            owner = tangent if tangent._base is None else tangent._base  # .grad, not its view
            self._parameter_storages[tangent.untyped_storage().data_ptr()] = weakref.ref(owner)
            return tangent
        tangent = self._tangents.get(value)
        if tangent is _REUSED:
            raise TangentReused("a tangent was read after relu had overwritten it")
        return tangent

    def row_blocks(self, value: object) -> Iterator[tuple[int, int, torch.Tensor]] | None:
        """A parameter's tangent a block of rows at a time, if the source draws it so."""
        index = self._index.get(id(value)) if isinstance(value, torch.Tensor) else None
        if index is None or self._row_blocks is None:
            return None
        return self._row_blocks(index)

    def track(
        self, out: torch.Tensor, tangent: torch.Tensor | None, fresh: bool = False
    ) -> torch.Tensor:
        """Record ``tangent`` for ``out``; ``fresh``: the rule allocated it for ``out`` alone."""
        self._owns.pop(out, None)
        if tangent is not None:
            shape = (self.count, *out.shape)
            if tangent.shape != shape:
                tangent, fresh = tangent.expand(shape), False
            self._tangents[out] = tangent
            if fresh:
                self._owns[out] = True
        return out

    def reusable(self, x: torch.Tensor, tangent: torch.Tensor) -> bool:
        """May ``x``'s tangent be overwritten? Only if a rule made it for ``x`` alone and no
        other tensor's tangent has since become a view of it."""
        if not (self.reuse and x in self._owns) or id(x) in self._index:
            return False
        pointer = tangent.untyped_storage().data_ptr()
        owner = self._parameter_storages.get(pointer)
        if owner is not None and owner() is not None:
            return False
        return not any(
            other is not x
            and isinstance(t, torch.Tensor)
            and t.untyped_storage().data_ptr() == pointer
            for other, t in self._tangents.items()
        )

    def _carries(self, value: object) -> bool:
        if isinstance(value, torch.Tensor):
            return id(value) in self._index or value in self._tangents
        if isinstance(value, (list, tuple)):
            return any(self._carries(v) for v in value)
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not (self._carries(args) or self._carries(tuple(kwargs.values()))):
            return func(*args, **kwargs)
        if self._inside_custom_function():
            # Its derivative is its own jvp, not that of the operations in its forward.
            raise Unsupported("no stacked-tangent rule for a custom torch.autograd.Function")
        name = getattr(func, "__name__", "")
        rule = _RULES.get(func)
        if rule is not None:
            try:
                return rule(self, func, *args, **kwargs)
            except Unsupported:
                raise
            except Exception as error:  # a case the rule does not cover: the general path
                raise Unsupported(f"the stacked-tangent rule for {name} failed: {error}") from error
        if name == "__get__":  # an attribute such as x.shape or x.T
            attribute = getattr(getattr(func, "__self__", None), "__name__", "")
            if attribute in _ATTRIBUTES:
                return func(*args, **kwargs)
            if attribute in ("T", "mT"):
                return _transpose_last(self, func, *args, **kwargs)
            name = f"Tensor.{attribute}"
        elif name in _CONSTANT_RESULTS:
            return func(*args, **kwargs)
        raise Unsupported(f"no stacked-tangent rule for {name or func}")

    def _inside_custom_function(self) -> bool:
        # A custom Function's forward is called from C++ by Function.apply, whose Python frame
        # therefore sits on the stack between this operation and the closure.
        frame = sys._getframe(2)
        while frame is not None and frame is not self.boundary:
            if frame.f_code is _FUNCTION_APPLY:
                return True
            frame = frame.f_back
        return False


_FUNCTION_APPLY = torch.autograd.Function.apply.__func__.__code__

# Attributes and functions whose result carries no derivative (shapes, comparisons, detach).
_ATTRIBUTES = frozenset(
    "shape dtype device ndim is_cuda layout requires_grad is_leaf grad_fn data names "
    "is_sparse is_quantized is_meta is_mkldnn output_nr _version nbytes itemsize".split()
)
_CONSTANT_RESULTS = frozenset(
    "size dim ndimension numel nelement __len__ stride storage_offset is_contiguous "
    "is_floating_point is_complex element_size data_ptr untyped_storage item tolist __bool__ "
    "__float__ __int__ __index__ __format__ __repr__ __str__ __hash__ argmax argmin eq ne lt "
    "le gt ge __eq__ __ne__ __lt__ __le__ __gt__ __ge__ isnan isinf isfinite isclose allclose "
    "equal detach sign get_device numpy".split()
)


# ---------------------------------------------------------------------------------------------
# Rules. Each gets the mode, the intercepted function and its arguments, computes the primal
# with that function and returns it, after recording its tangent with ``mode.track``.


def _lift(tangent: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a ``(K, *shape)`` tangent as ``(K, 1, ..., *shape)`` with ``ndim`` dims after K, so
    that it broadcasts against a tensor of ``ndim`` dims the way the primal did."""
    missing = ndim - (tangent.dim() - 1)
    if missing <= 0:
        return tangent
    return tangent.reshape(tangent.shape[0], *([1] * missing), *tangent.shape[1:])


def _arg(args, kwargs, position: int, name: str, default=None):
    if len(args) > position:
        return args[position]
    return kwargs.get(name, default)


def _linear(mode, func, x, weight, bias=None):
    out = func(x, weight, bias)
    tx, tb = mode.tangent(x), mode.tangent(bias)
    # The weight's K tangents, whole or (ForwardSGD, a large weight) a block of rows at a time.
    blocks = mode.row_blocks(weight)
    if blocks is None:
        tw = mode.tangent(weight)
        blocks = None if tw is None else [(0, weight.shape[0], tw)]
    count = mode.count
    tangent = None  # kept of shape (K, *out.shape); the products work on views of it
    if tx is not None:
        tangent = F.linear(tx, weight)  # all K·B rows in one product
    if blocks is not None:  # x V_kᵀ into each block's output columns, in place
        rows = x.reshape(-1, x.shape[-1])
        beta = 1
        if tangent is None:
            tangent = torch.empty((count, *out.shape), dtype=out.dtype, device=out.device)
            beta = 0  # the blocks write every column once; addmm ignores the empty input
        stacked = tangent.view(count, rows.shape[0], weight.shape[0])
        for start, stop, v in blocks:
            columns = stacked[:, :, start:stop]
            if count == 1:
                columns[0].addmm_(rows, v[0].T, beta=beta)
            else:
                columns.baddbmm_(rows.expand(count, *rows.shape), v.transpose(1, 2), beta=beta)
    fresh = tangent is not None  # allocated here, not a view of the bias's tangent
    if tb is not None:
        bias_tangent = _lift(tb, out.dim())
        tangent = bias_tangent if tangent is None else tangent.add_(bias_tangent)
    return mode.track(out, tangent, fresh=fresh)


def _shaped(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``t``, just computed, given ``shape`` in place rather than viewed."""
    if t.shape == tuple(shape):
        return t
    if t.is_contiguous() and not t._is_view():
        return t.resize_(shape)
    return t.reshape(shape)


def _convolution(mode, func, x, weight, bias=None, *args, **kwargs):
    out = func(x, weight, bias, *args, **kwargs)
    tx, tw, tb = mode.tangent(x), mode.tangent(weight), mode.tangent(bias)
    count, batched = mode.count, x.dim() == weight.dim()
    if tw is not None and _arg(args, kwargs, 3, "groups", 1) != 1:
        raise Unsupported("no stacked-tangent rule for a grouped convolution's weight")
    tangent = None
    slices = _batch_slices(out, 2 * count) if batched else [slice(None)]
    if (tx is not None or tw is not None) and len(slices) == 1:
        tangent = _convolution_tangent(func, x, tx, weight, tw, count, args, kwargs)
    elif count == 1 and (tx is not None or tw is not None):
        # A slice of the batch at a time: whole, each product would leave one more
        # activation-sized temporary (two, when oneDNN reorders its output) at the peak.
        tangent = torch.empty((count, *out.shape), dtype=out.dtype, device=out.device)
        for rows in slices:
            part = None if tx is None else tx[:, rows]
            tangent[:, rows] = _convolution_tangent(
                func, x[rows], part, weight, tw, count, args, kwargs
            )
    elif tx is not None or tw is not None:
        # K > 1: the K·B tangent images in one convolution, and x ⊛ V_k, whose (B, K·C_out,
        # ...) result would be K activations more, a slice of the batch at a time.
        if tx is not None:
            tangent = _convolution_tangent(func, x, tx, weight, None, count, args, kwargs)
        if tw is not None:
            fresh = tangent is None
            if fresh:
                tangent = torch.empty((count, *out.shape), dtype=out.dtype, device=out.device)
            filters = tw.flatten(0, 1)
            for rows in slices:
                stacked = func(x[rows], filters, None, *args, **kwargs)
                stacked = stacked.unflatten(1, (count, -1)).transpose(0, 1)
                target = tangent[:, rows]
                target.copy_(stacked) if fresh else target.add_(stacked)
    if tb is not None:
        channel = 1 if batched else 0
        bias_tangent = tb.reshape(count, *([1] * channel), -1, *([1] * (out.dim() - channel - 1)))
        tangent = bias_tangent if tangent is None else tangent.add_(bias_tangent)
    return mode.track(out, tangent, fresh=tx is not None or tw is not None)


def _convolution_tangent(func, x, tx, weight, tw, count, args, kwargs) -> torch.Tensor:
    """ẋ_k ⊛ W + x ⊛ V_k for all k: one convolution of the K·B tangent images, and one of
    the images with the K weight tangents stacked as K·C_out filters."""
    batched = x.dim() == weight.dim()
    result = None
    if tx is not None:
        images = func(tx.flatten(0, 1) if batched else tx, weight, None, *args, **kwargs)
        result = _shaped(images, (count, *([x.shape[0]] if batched else []), *images.shape[1:]))
    if tw is not None:
        stacked = func(x, tw.flatten(0, 1), None, *args, **kwargs)  # (B, K·C_out, ...)
        if batched:
            stacked = stacked.unflatten(1, (count, -1)).transpose(0, 1)
        else:
            stacked = stacked.unflatten(0, (count, -1))
        result = stacked.contiguous() if result is None else result.add_(stacked)
    return result


def _matmul(mode, func, a, b):
    out = func(a, b)
    ta, tb = mode.tangent(a), mode.tangent(b)
    tangent = None
    if ta is not None:
        tangent = torch.vmap(lambda t: torch.matmul(t, b))(ta)
    if tb is not None:
        term = torch.vmap(lambda t: torch.matmul(a, t))(tb)
        tangent = term if tangent is None else tangent + term
    return mode.track(out, tangent)


def _concatenate(mode, func, tensors, dim=0, **kwargs):
    out = func(tensors, dim, **kwargs)
    parts = []
    for t in tensors:
        tangent = mode.tangent(t)
        if tangent is None:
            tangent = torch.zeros((mode.count, *t.shape), dtype=out.dtype, device=out.device)
        parts.append(tangent)
    # stack adds a dimension, so its dim may be one past the inputs' last.
    ndim = out.dim()
    return mode.track(out, func(parts, dim % ndim + 1))


def _scaled(derivative: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """A rule for y = f(x) elementwise: ẏ = f'(x) ẋ, with f' from the input and output."""

    def rule(mode, func, x, *args, **kwargs):
        if kwargs.get("inplace") or any(a is True for a in args):  # F.silu(x, True) and kin
            raise Unsupported(f"no stacked-tangent rule for in-place {func.__name__}")
        tx = mode.tangent(x)
        out = func(x, *args, **kwargs)
        tangent = _lift(tx, out.dim()) * derivative(x, out, *args, **kwargs)
        return mode.track(out, tangent, fresh=True)

    return rule


def _relu(mode, func, x, *args, **kwargs):
    inplace = func in _IN_PLACE_RELU or bool(_arg(args, kwargs, 0, "inplace", False))
    tx = mode.tangent(x)
    if inplace:
        if id(x) in mode._index or x._is_view() or _shares_storage(mode, x):
            raise Unsupported("no stacked-tangent rule for in-place relu on a view or parameter")
        out = torch.relu_(x)
    else:
        out = torch.relu(x)
    # ẏ = ẋ where y > 0, else 0: relu's own backward kernel, broadcast over K. Written over ẋ
    # only when no other tensor shares ẋ (h - c shares h's); x's tangent is then gone, and
    # reading it again makes the caller run the closure once more without this.
    if mode.reusable(x, tx):
        torch.ops.aten.threshold_backward.grad_input(tx, out, 0, grad_input=tx)
        if out is not x:
            mode._tangents[x] = _REUSED
            mode._owns.pop(x, None)
        return mode.track(out, tx, fresh=True)
    tangent = torch.ops.aten.threshold_backward(tx, out, 0)
    return mode.track(out, tangent, fresh=True)


_REUSED = object()  # in place of a tangent that relu has overwritten


def _shares_storage(mode, x: torch.Tensor) -> bool:
    pointer = x.untyped_storage().data_ptr()
    return any(
        t is not x and t.untyped_storage().data_ptr() == pointer for t in mode._tangents.keys()
    )


def _gelu_derivative(x, out, approximate="none"):
    if approximate == "tanh":  # 0.5 x (1 + tanh u), u = √(2/π) (x + 0.044715 x³)
        c = math.sqrt(2 / math.pi)
        t = torch.tanh(c * (x + 0.044715 * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
    if approximate != "none":
        raise Unsupported(f"no stacked-tangent rule for gelu approximate={approximate!r}")
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    return cdf + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _silu_derivative(x, out, inplace=False):
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _leaky_relu_derivative(x, out, negative_slope=0.01, inplace=False):
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return torch.where(x > 0, one, one * negative_slope)


def _reshaped(mode, func, x, *args, **kwargs):
    """Operations that keep the elements in order: the tangent takes the output's shape."""
    out = func(x, *args, **kwargs)
    if not isinstance(out, torch.Tensor) or out.numel() != x.numel() or out.dtype != x.dtype:
        raise Unsupported(f"no stacked-tangent rule for {func.__name__} that changes dtype")
    tx = mode.tangent(x)
    return mode.track(out, tx.reshape(mode.count, *out.shape))


def _to(mode, func, x, *args, **kwargs):
    out = func(x, *args, **kwargs)
    if not out.is_floating_point():
        return out
    return mode.track(out, mode.tangent(x).to(dtype=out.dtype, device=out.device))


def _transpose(mode, func, x, *args, **kwargs):
    out = func(x, *args, **kwargs)
    dims = [_arg(args, kwargs, 0, "dim0"), _arg(args, kwargs, 1, "dim1")]
    dims = [d % x.dim() + 1 for d in dims]
    return mode.track(out, mode.tangent(x).transpose(*dims))


def _transpose_last(mode, func, x, *args, **kwargs):
    if x.dim() > 2 and getattr(getattr(func, "__self__", None), "__name__", "") == "T":
        raise Unsupported("no stacked-tangent rule for Tensor.T on more than two dimensions")
    out = func(x, *args, **kwargs)
    if x.dim() < 2:
        return mode.track(out, mode.tangent(x))
    return mode.track(out, mode.tangent(x).transpose(-1, -2))


def _permute(mode, func, x, *dims, **kwargs):
    out = func(x, *dims, **kwargs)
    order = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
    order = kwargs.get("dims", order)
    return mode.track(out, mode.tangent(x).permute(0, *[d % x.dim() + 1 for d in order]))


def _getitem(mode, func, x, index):
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, list) and any(isinstance(j, (list, tuple)) for j in i) for i in index):
        raise Unsupported("no stacked-tangent rule for indexing with nested lists")
    advanced = [i for i in index if isinstance(i, (torch.Tensor, list))]
    if len(advanced) > 1:
        raise Unsupported("no stacked-tangent rule for indexing with several index tensors")
    if any(mode._carries(i) for i in advanced):
        raise Unsupported("no stacked-tangent rule for an index computed from the parameters")
    out = func(x, index)
    return mode.track(out, mode.tangent(x)[(slice(None), *index)])


def _sum_or_mean(mode, func, x, *args, **kwargs):
    out = func(x, *args, **kwargs)
    tx = mode.tangent(x)
    dim = _arg(args, kwargs, 0, "dim")
    keepdim = bool(_arg(args, kwargs, 1, "keepdim", False))
    reduce = torch.mean if func.__name__ == "mean" else torch.sum
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        tangent = reduce(tx.reshape(mode.count, -1), dim=1)
    else:
        dims = [dim] if isinstance(dim, int) else list(dim)
        tangent = reduce(tx, dim=[d % max(x.dim(), 1) + 1 for d in dims], keepdim=keepdim)
    return mode.track(out, tangent.to(out.dtype).reshape(mode.count, *out.shape))


def _add_or_sub(sign: float, reflected: bool = False):
    def rule(mode, func, a, b, *args, **kwargs):
        out = func(a, b, *args, **kwargs)
        alpha = _arg(args, kwargs, 0, "alpha", 1)
        ta, tb = mode.tangent(a), mode.tangent(b)
        if reflected:  # b - a
            ta, tb = tb, ta
        tangent = None if ta is None else _lift(ta, out.dim())
        if tb is not None:
            term = _lift(tb, out.dim()) * (sign * alpha)
            tangent = term if tangent is None else tangent + term
        return mode.track(out, tangent, fresh=tb is not None)

    return rule


def _mul(mode, func, a, b):
    out = func(a, b)
    ta, tb = mode.tangent(a), mode.tangent(b)
    tangent = None if ta is None else _lift(ta, out.dim()) * b
    if tb is not None:
        term = a * _lift(tb, out.dim())
        tangent = term if tangent is None else tangent + term
    return mode.track(out, tangent)


def _div(mode, func, a, b, *args, **kwargs):
    if _arg(args, kwargs, 0, "rounding_mode") is not None:
        raise Unsupported("no stacked-tangent rule for division with rounding")
    out = func(a, b, *args, **kwargs)
    ta, tb = mode.tangent(a), mode.tangent(b)
    tangent = None if ta is None else _lift(ta, out.dim()) / b
    if tb is not None:
        term = -out / b * _lift(tb, out.dim())
        tangent = term if tangent is None else tangent + term
    return mode.track(out, tangent)


def _rdiv(mode, func, a, b):  # b / a
    out = func(a, b)
    ta, tb = mode.tangent(a), mode.tangent(b)
    tangent = None if ta is None else -out / a * _lift(ta, out.dim())
    if tb is not None:
        term = _lift(tb, out.dim()) / a
        tangent = term if tangent is None else tangent + term
    return mode.track(out, tangent)


def _neg(mode, func, x):
    return mode.track(func(x), -mode.tangent(x))


def _pow(mode, func, x, exponent):
    if isinstance(exponent, torch.Tensor) or mode.tangent(x) is None:
        raise Unsupported("no stacked-tangent rule for pow with a tensor exponent")
    out = func(x, exponent)
    return mode.track(out, mode.tangent(x) * (exponent * x.pow(exponent - 1)))


def _max_pool(mode, func, x, *args, **kwargs):
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    options = dict(zip(names, args))
    options.update(kwargs)
    wants_indices = options.pop("return_indices", func is F.max_pool2d_with_indices)
    if options.get("stride") == ():  # torch.max_pool2d's default: the kernel size
        options["stride"] = None
    tx, count = mode.tangent(x), mode.count
    slices = [slice(None)] if wants_indices or x.dim() == 3 else _batch_slices(x, 2)
    if len(slices) == 1:
        out, indices = F.max_pool2d(x, **options, return_indices=True)
        mode.track(out, _gather_maxima(tx, indices, count), fresh=True)
        return (out, indices) if wants_indices else out
    # Big: the int64 indices of the whole batch would be an activation-sized temporary; pool
    # again a slice at a time for the tangent instead.
    out = F.max_pool2d(x, **options)
    tangent = torch.empty((count, *out.shape), dtype=tx.dtype, device=tx.device)
    for rows in slices:
        _, indices = F.max_pool2d(x[rows], **options, return_indices=True)
        tangent[:, rows] = _gather_maxima(tx[:, rows], indices, count)
    return mode.track(out, tangent, fresh=True)


def _gather_maxima(tx: torch.Tensor, indices: torch.Tensor, count: int) -> torch.Tensor:
    """ẏ = ẋ at the position of each maximum, for every tangent."""
    where = indices.flatten(-2).expand(count, *indices.shape[:-2], -1)
    return _shaped(tx.flatten(-2).gather(-1, where), (count, *indices.shape))


# Activation-sized temporaries above this are computed a slice of the batch at a time.
TEMPORARY_BYTES = 32 * 2**20


def _batch_slices(like: torch.Tensor, factor: int) -> list[slice]:
    """Slices of dim 0 of ``like`` such that ``factor`` times a slice of it fits
    ``TEMPORARY_BYTES`` (one slice, the whole batch, when all of it does)."""
    total = factor * like.numel() * like.element_size()
    pieces = min(-(-total // TEMPORARY_BYTES), like.shape[0])
    if pieces <= 1:
        return [slice(None)]
    size = -(-like.shape[0] // pieces)
    return [slice(start, start + size) for start in range(0, like.shape[0], size)]


def _pooled(mode, func, x, *args, **kwargs):
    """Pooling that is linear in its input (average pools): the same pool of each tangent."""
    out = func(x, *args, **kwargs)
    tx = mode.tangent(x)
    batched = x.dim() == 4
    tangent = func(tx.flatten(0, 1) if batched else tx, *args, **kwargs)
    return mode.track(out, _shaped(tangent, (mode.count, *out.shape)), fresh=True)


def _dropout(mode, func, x, p=0.5, training=True, inplace=False):
    if inplace:
        raise Unsupported("no stacked-tangent rule for in-place dropout")
    tx = mode.tangent(x)
    if not training or p == 0:
        return mode.track(func(x, p, training), tx)
    # The same mask for the primal and every tangent, drawn as ATen draws it on the CPU.
    if x.device.type != "cpu" or p == 1:
        raise Unsupported("no stacked-tangent rule for dropout off the CPU")
    noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
    return mode.track(x * noise, _lift(tx, x.dim()) * noise)


def _batch_norm(
    mode,
    func,
    x,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
):
    if mode._carries((running_mean, running_var)):
        raise Unsupported("no stacked-tangent rule for batch norm with trainable statistics")
    out = func(x, running_mean, running_var, weight, bias, training, momentum, eps)
    tx, tw, tb = mode.tangent(x), mode.tangent(weight), mode.tangent(bias)
    count, channel_shape = mode.count, [1, -1] + [1] * (x.dim() - 2)
    dims = [0] + list(range(2, x.dim()))
    if training:
        mean = x.mean(dims, keepdim=True)
        inv_std = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
    else:
        mean = running_mean.view(channel_shape)
        inv_std = torch.rsqrt(running_var.view(channel_shape) + eps)
    normalized = (x - mean) * inv_std
    scale = inv_std if weight is None else inv_std * weight.view(channel_shape)
    tangent = _normalization_tangent(
        tx,
        None if tw is None else tw.view(count, *channel_shape),
        None if tb is None else tb.view(count, *channel_shape),
        normalized,
        scale,
        dims if training else None,  # in training the batch statistics move with x too
    )
    return mode.track(out, tangent, fresh=tx is not None or tw is not None)


def _normalization_tangent(tx, tw, tb, normalized, scale, moving_dims):
    """The tangent of y = x̂ γ + β, x̂ = (x − μ) / σ: ẋ · scale (scale = γ / σ) plus ẇ x̂ + ḃ.

    ``tw`` and ``tb`` are the affine tangents shaped to broadcast (None: constant). With
    ``moving_dims``, μ and σ are x's statistics over those dims and move with it, so ẋ first
    loses its mean and its component along x̂ there."""
    tangent = None
    if tx is not None:
        if moving_dims is not None:
            tdims = [d + 1 for d in moving_dims]
            centred = tx - tx.mean(tdims, keepdim=True)
            tx = centred - normalized * (centred * normalized).mean(tdims, keepdim=True)
        tangent = tx * scale
    for term in (None if tw is None else tw * normalized, tb):
        if term is not None:
            tangent = term if tangent is None else tangent + term
    return tangent


def _layer_norm(mode, func, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    out = func(x, normalized_shape, weight, bias, eps)
    tx, tw, tb = mode.tangent(x), mode.tangent(weight), mode.tangent(bias)
    dims = list(range(x.dim() - len(normalized_shape), x.dim()))
    mean = x.mean(dims, keepdim=True)
    inv_std = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
    normalized = (x - mean) * inv_std
    tangent = _normalization_tangent(
        tx,
        None if tw is None else _lift(tw, x.dim()),
        None if tb is None else _lift(tb, x.dim()),
        normalized,
        inv_std if weight is None else inv_std * weight,
        dims,  # the statistics always move with x
    )
    return mode.track(out, tangent, fresh=tx is not None or tw is not None)


def _embedding(mode, func, indices, weight, padding_idx=None, max_norm=None, *args, **kwargs):
    if max_norm is not None:  # it renormalises the rows it looks up, in place
        raise Unsupported("no stacked-tangent rule for embedding with max_norm")
    if mode._carries(indices):
        raise Unsupported("no stacked-tangent rule for embedding indices computed from parameters")
    out = func(indices, weight, padding_idx, max_norm, *args, **kwargs)
    blocks = mode.row_blocks(weight)
    if blocks is None:
        tw = mode.tangent(weight)  # the rows looked up, of every tangent
        tangent = tw[:, indices] if tw is not None else None
        # A 0-dim index selects a view of the table's tangent (.grad, for K = 1), not a copy.
        return mode.track(out, tangent, fresh=tw is not None and indices.dim() > 0)
    tangent = torch.empty((mode.count, *out.shape), dtype=out.dtype, device=out.device)
    for start, stop, v in blocks:  # the looked-up rows that fall in each block of the table
        inside = (indices >= start) & (indices < stop)
        tangent[:, inside] = v[:, indices[inside] - start]
    return mode.track(out, tangent, fresh=True)


def _log_softmax(mode, func, x, *args, **kwargs):
    out = func(x, *args, **kwargs)
    dim = _arg(args, kwargs, 0, "dim")
    if dim is None:
        raise Unsupported("no stacked-tangent rule for log_softmax without dim")
    tx, d = mode.tangent(x), dim % x.dim() + 1
    return mode.track(out, tx - (tx * out.exp()).sum(d, keepdim=True))


def _softmax(mode, func, x, *args, **kwargs):
    out = func(x, *args, **kwargs)
    dim = _arg(args, kwargs, 0, "dim")
    if dim is None:
        raise Unsupported("no stacked-tangent rule for softmax without dim")
    tx, d = mode.tangent(x), dim % x.dim() + 1
    return mode.track(out, out * (tx - (tx * out).sum(d, keepdim=True)))


_LOSS_NAMES = ("target", "weight", "size_average", "ignore_index", "reduce", "reduction")


def _loss_options(args, kwargs, names=_LOSS_NAMES) -> dict:
    options = dict(zip(names, args))
    options.update(kwargs)
    if options.get("size_average") is not None or options.get("reduce") is not None:
        raise Unsupported("no stacked-tangent rule for the deprecated size_average/reduce")
    return options


def _reduce_loss(per_item: torch.Tensor, reduction: str, divisor) -> torch.Tensor:
    flat = per_item.reshape(per_item.shape[0], -1)
    if reduction == "none":
        return per_item
    total = flat.sum(1)
    return total / divisor if reduction == "mean" else total


def _class_log_likelihood_tangent(mode, tlogp, target, options):
    """ẏ of nll_loss for log-probabilities whose tangent is ``tlogp`` (K, N, C, ...)."""
    if mode._carries(target) or options.get("weight") is not None:
        raise Unsupported("no stacked-tangent rule for weighted or parameter-dependent targets")
    ignore = options.get("ignore_index", -100)
    reduction = options.get("reduction", "mean")
    if target.is_floating_point():  # class probabilities
        per_item = -(tlogp * target).sum(2 if tlogp.dim() > 2 else 1)
        divisor = per_item[0].numel()
    else:
        valid = target != ignore
        index = torch.where(valid, target, 0).unsqueeze(1 if target.dim() > 0 else 0)
        index = index.expand(mode.count, *index.shape)
        class_dim = 2 if tlogp.dim() > 2 or target.dim() > 0 else 1
        per_item = -tlogp.gather(class_dim, index).squeeze(class_dim) * valid
        divisor = valid.sum()
    return _reduce_loss(per_item, reduction, divisor)


def _nll_loss(mode, func, logp, *args, **kwargs):
    options = _loss_options(args, kwargs)
    out = func(logp, *args, **kwargs)
    tangent = _class_log_likelihood_tangent(mode, mode.tangent(logp), options["target"], options)
    return mode.track(out, tangent)


def _cross_entropy(mode, func, logits, *args, **kwargs):
    options = _loss_options(args, kwargs, (*_LOSS_NAMES, "label_smoothing"))
    if options.get("label_smoothing", 0.0):
        raise Unsupported("no stacked-tangent rule for cross-entropy with label smoothing")
    out = func(logits, *args, **kwargs)
    class_dim = 1 if logits.dim() > 1 else 0
    logp = torch.log_softmax(logits, class_dim)
    tx = mode.tangent(logits)
    tlogp = tx - (tx * logp.exp()).sum(class_dim + 1, keepdim=True)
    tangent = _class_log_likelihood_tangent(mode, tlogp, options["target"], options)
    return mode.track(out, tangent)


def _mse_loss(mode, func, x, target, *args, **kwargs):
    options = _loss_options(args, kwargs, ("size_average", "reduce", "reduction", "weight"))
    if options.get("weight") is not None:
        raise Unsupported("no stacked-tangent rule for weighted mse_loss")
    out = func(x, target, *args, **kwargs)
    difference = x - target
    tangent = None
    for t, sign in ((mode.tangent(x), 2.0), (mode.tangent(target), -2.0)):
        if t is not None:
            term = _lift(t, difference.dim()) * (sign * difference)
            tangent = term if tangent is None else tangent + term
    reduction = options.get("reduction", "mean")
    if reduction != "none":
        tangent = tangent.reshape(mode.count, -1)
        tangent = tangent.mean(1) if reduction == "mean" else tangent.sum(1)
    return mode.track(out, tangent)


def _rules() -> dict:
    def functions(*names: str, owners=(torch, torch.Tensor, F)) -> list:
        found = []
        for name in names:
            for owner in owners:
                f = getattr(owner, name, None)
                if callable(f) and f not in found:
                    found.append(f)
        return found

    tensor_methods = (torch.Tensor,)
    table: list[tuple[list, Callable]] = [
        (functions("linear"), _linear),
        (functions("conv1d", "conv2d", "conv3d"), _convolution),
        (functions("matmul", "mm", "bmm", "__matmul__"), _matmul),
        (functions("relu", "relu_"), _relu),
        (functions("tanh"), _scaled(lambda x, y: 1 - y * y)),
        (functions("sigmoid"), _scaled(lambda x, y: y * (1 - y))),
        (functions("gelu"), _scaled(_gelu_derivative)),
        (functions("silu"), _scaled(_silu_derivative)),
        (functions("leaky_relu"), _scaled(_leaky_relu_derivative)),
        (functions("exp"), _scaled(lambda x, y: y)),
        (functions("log"), _scaled(lambda x, y: 1 / x)),
        (functions("sqrt"), _scaled(lambda x, y: 0.5 / y)),
        (functions("reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "clone"), _reshaped),
        (
            functions("view", "contiguous", "view_as", "reshape_as", owners=tensor_methods),
            _reshaped,
        ),
        (functions("to", "float", "double", "half", "bfloat16", owners=tensor_methods), _to),
        (functions("transpose", "swapaxes"), _transpose),
        (functions("t"), _transpose_last),
        (functions("permute"), _permute),
        (functions("__getitem__", owners=tensor_methods), _getitem),
        (functions("sum", "mean"), _sum_or_mean),
        (functions("cat", "concat", "concatenate", "stack"), _concatenate),
        (functions("add", "__add__", "__radd__"), _add_or_sub(1.0)),
        (functions("sub", "__sub__"), _add_or_sub(-1.0)),
        (functions("__rsub__"), _add_or_sub(-1.0, reflected=True)),
        (functions("mul", "__mul__", "__rmul__"), _mul),
        (functions("div", "__truediv__"), _div),
        (functions("__rtruediv__"), _rdiv),
        (functions("neg", "__neg__"), _neg),
        (functions("pow", "__pow__"), _pow),
        ([torch.max_pool2d, F.max_pool2d, F.max_pool2d_with_indices], _max_pool),
        (functions("avg_pool2d", "adaptive_avg_pool2d", owners=(F,)), _pooled),
        ([F.dropout], _dropout),
        ([F.batch_norm], _batch_norm),
        ([F.layer_norm], _layer_norm),
        ([F.embedding], _embedding),
        (functions("log_softmax"), _log_softmax),
        (functions("softmax"), _softmax),
        ([F.nll_loss], _nll_loss),
        ([F.cross_entropy], _cross_entropy),
        ([F.mse_loss], _mse_loss),
    ]
    return {f: rule for funcs, rule in table for f in funcs}


_RULES = _rules()
_IN_PLACE_RELU = frozenset(f for f in (torch.relu_, torch.Tensor.relu_, F.relu_) if f is not None)
