"""The stacked-tangent evaluation: the loss computed once, the K tangents stacked beside it.

The closure runs once under ``StackedTangents``, a ``TorchFunctionMode`` that keeps, beside
every tensor computed from the parameters, its K tangents as one tensor of shape
``(K, *shape)``, and pushes them through each operation by that operation's Jacobian-vector
product. For a linear layer y = x Wᵀ + b:

    ẏ_k = ẋ_k Wᵀ + x V_kᵀ + v_k,

one matrix product with K·B rows and one with the K weight tangents, while the primal y is
computed once. A parameter's tangent is asked of the ``TangentSource`` when the first operation
that uses it runs, so the source can draw it then and drop it or draw it again later;
intermediate tangents die with their activations. A structured weight tangent V_k = A_k B_kᵀ
(``tangents.structured``) comes as its factors instead (``factors``), and x V_kᵀ = (x B_k) A_kᵀ
costs two thin products.

Each operation on a tangent-carrying tensor goes, in this order, to

1. nothing at all, for results that carry no derivative (shapes, comparisons, ``detach``);
2. a hand-written rule (``jvp.rules``) where one pays in time or memory;
3. PyTorch's own forward-mode formula for that one call (``forward_ad_call``): the call runs on
   dual tensors, once per tangent, and its outputs' tangents are stacked again. This is how
   every operation that PyTorch can differentiate in forward mode is covered without a rule.

In-place operations run out of place and are written back, tangent included, into the mutated
tensor (and so into the views that share its memory). What cannot be done safely raises
``Unsupported`` and the engine takes the general path for that model.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from forwardgrad.jvp import inject, rule_check
from forwardgrad.jvp.forward_ad import forward_ad_call
from forwardgrad.jvp.in_place import out_of_place
from forwardgrad.jvp.routes import COMPOSITES, CONTEXTS
from forwardgrad.jvp.rules import RULES, Decline
from forwardgrad.tangents.sources import TangentSource


class Unsupported(RuntimeError):
    """The stacked evaluation cannot run this closure; the message says what stopped it."""


class TangentReused(Unsupported):
    """A tensor's tangent was read after relu had reused it in place for its output."""


_REUSED = object()  # in place of a tangent that relu has overwritten

# Attributes and functions whose result carries no derivative.
_ATTRIBUTES = frozenset(
    "shape dtype device ndim is_cuda layout requires_grad is_leaf grad_fn data names "
    "is_sparse is_quantized is_meta is_mkldnn output_nr _version nbytes itemsize is_nested "
    "is_cpu is_xpu is_mps grad".split()
)
_CONSTANT_RESULTS = frozenset(
    "size dim ndimension numel nelement __len__ stride storage_offset is_contiguous "
    "is_floating_point is_complex element_size data_ptr untyped_storage item tolist __bool__ "
    "__float__ __int__ __index__ __format__ __repr__ __str__ __hash__ argmax argmin argsort "
    "eq ne lt le gt ge __eq__ __ne__ __lt__ __le__ __gt__ __ge__ isnan isinf isfinite isclose "
    "allclose equal detach detach_ sign get_device numpy requires_grad_ retain_grad "
    "register_hook is_set_to new_empty new_zeros new_ones new_full new_tensor logical_not "
    "logical_and logical_or any all is_nonzero is_same_size count_nonzero".split()
)


class StackedTangents(TorchFunctionMode):
    """Carries K tangents beside each tensor computed from the source's parameters.

    Args:
        source: where parameter i's tangents come from (``source(i)``, shape ``(K, *shape)``).
        reuse: may relu write its output's tangent over its input's (see ``reusable``)?
        check_rules: check each rule, the first time it runs on inputs of a kind, against
            PyTorch's formula on a float64 slice of them (``jvp.rule_check``).
        buffers: the model's buffers, which that slice never cuts (running statistics with as
            many channels as the batch has rows are no rows of the batch).
    """

    def __init__(
        self,
        source: TangentSource,
        reuse: bool = False,
        check_rules: bool = False,
        buffers: Iterable[torch.Tensor] = (),
    ) -> None:
        super().__init__()
        self.source, self.count, self.reuse = source, source.count, reuse
        self.check_rules = check_rules  # check each rule's first use (``jvp.rule_check``)
        self._buffers = {id(b) for b in buffers}
        self._checked: set = set()
        self._index = {id(p): i for i, p in enumerate(source.params)}
        self._tangents = WeakIdKeyDictionary()
        # Tensors whose tangent a rule allocated for them alone (not a view of another
        # tensor's, nor a parameter's tangent, which may be its .grad).
        self._owns = WeakIdKeyDictionary()
        # Tensors that became tangent-carrying through an in-place write: a view of one taken
        # earlier finds its tangent through its base.
        self._written = WeakIdKeyDictionary()
        # Storages of the parameter tangents handed out, never to be written: pointer -> a
        # weak reference to the tensor that owns it (a freed address may be reused).
        self._parameter_storages: dict[int, weakref.ref] = {}
        # Factors of tensors that are no parameter of the source (the rule checks' copies).
        self._factors = WeakIdKeyDictionary()
        self.factored = 0  # how often factors were handed out (to rules, to the rule checks)
        self.boundary = None  # the frame that runs the closure: where the stack search stops
        self.forward_ad_calls: dict[str, int] = {}  # functions without a rule, and how often

    # ------------------------------------------------------------------ tangents of tensors

    def is_parameter(self, value: object) -> bool:
        return isinstance(value, torch.Tensor) and id(value) in self._index

    def is_buffer(self, value: object) -> bool:
        return isinstance(value, torch.Tensor) and id(value) in self._buffers

    def tangent(self, value: object) -> torch.Tensor | None:
        """The ``(K, *shape)`` tangent of ``value``, or ``None`` if it is a constant."""
        if not isinstance(value, torch.Tensor):
            return None
        index = self._index.get(id(value))
        if index is not None:
            tangent = self.source(index)
            owner = tangent if tangent._base is None else tangent._base  # .grad, not its view
            self._parameter_storages[tangent.untyped_storage().data_ptr()] = weakref.ref(owner)
            return tangent
        tangent = self._tangents.get(value)
        if tangent is _REUSED:
            raise TangentReused("a tangent was read after relu had overwritten it")
        if tangent is None and value._base is not None and value._base in self._written:
            tangent = self._view_of_base_tangent(value)
        return tangent

    def factors(self, value: object) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A, B)`` with ``value``'s tangents V_k = A_k B_kᵀ over ``value`` viewed as
        ``shape[0]`` rows of the rest, when they are structured, else ``None``. A rule that takes
        them must not ask for ``tangent(value)`` as well: that forms the whole tangents."""
        if not isinstance(value, torch.Tensor):
            return None
        index = self._index.get(id(value))
        found = self.source.factors(index) if index is not None else self._factors.get(value)
        self.factored += found is not None
        return found

    def track_factors(self, x: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Give ``x`` (tracked with its whole tangent too) structured tangents' factors."""
        self._factors[x] = factors

    def row_blocks(self, value: object) -> Iterator[tuple[int, int, torch.Tensor]] | None:
        """A parameter's tangent a block of rows at a time, if the source draws it so."""
        index = self._index.get(id(value)) if isinstance(value, torch.Tensor) else None
        return None if index is None else self.source.row_blocks(index)

    def track(
        self, out: torch.Tensor, tangent: torch.Tensor | None, fresh: bool = False
    ) -> torch.Tensor:
        """Record ``tangent`` for ``out``; ``fresh``: the rule allocated it for ``out`` alone."""
        self._owns.pop(out, None)
        if tangent is not None:
            shape = (self.count, *out.shape)
            if tangent.shape != shape:
                tangent, fresh = tangent.expand(shape), False
            if tangent.dtype != out.dtype and out.is_floating_point():
                tangent = tangent.to(out.dtype)
            self._tangents[out] = tangent
            if fresh:
                self._owns[out] = True
        else:
            self._tangents.pop(out, None)
        return out

    def add_tangent(self, value: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
        """ż ← ż + u for a tensor the closure computed (``jvp.inject``); ``tangent`` stays the
        caller's: it is tracked as it is only when z had none, and then never written over."""
        if self.is_parameter(value):
            raise Unsupported("a tangent injected at a parameter")
        current = self.tangent(value)
        if current is None:
            return self.track(value, tangent, fresh=False)
        return self.track(value, current + tangent, fresh=True)

    def carries(self, value: object) -> bool:
        if isinstance(value, torch.Tensor):
            if id(value) in self._index or value in self._tangents:
                return True
            return value._base is not None and value._base in self._written
        if isinstance(value, (list, tuple)):
            return any(self.carries(v) for v in value)
        if isinstance(value, dict):
            return any(self.carries(v) for v in value.values())
        return False

    def shares_storage(self, x: torch.Tensor) -> bool:
        """Does another tracked tensor use ``x``'s memory?"""
        pointer = x.untyped_storage().data_ptr()
        return any(
            t is not x and t.untyped_storage().data_ptr() == pointer for t in self._tangents.keys()
        )

    def reusable(self, x: torch.Tensor, tangent: torch.Tensor) -> bool:
        """May relu write its output's tangent over ``x``'s? Only if a rule made it for ``x``
        alone, it is no parameter's, and no other tensor's tangent has since become a view of
        it (not even a view of x's, which would keep reading the old values)."""
        return self.reuse and self._writable(x, tangent, views_follow=False)

    def mark_reused(self, x: torch.Tensor) -> None:
        """``x``'s tangent now belongs to another tensor: reading it again is an error."""
        self._tangents[x] = _REUSED
        self._owns.pop(x, None)

    def _writable(self, x: torch.Tensor, tangent: torch.Tensor | None, views_follow: bool) -> bool:
        """Is ``x``'s tangent x's alone to write? With ``views_follow`` the tangents of x's own
        views may share it: an in-place write into x changes them too, as it does their values."""
        if tangent is None or x not in self._owns or id(x) in self._index:
            return False
        pointer = tangent.untyped_storage().data_ptr()
        owner = self._parameter_storages.get(pointer)
        if owner is not None and owner() is not None:
            return False
        return not any(
            other is not x
            and isinstance(t, torch.Tensor)
            and t.untyped_storage().data_ptr() == pointer
            and not (views_follow and other._base is x)
            for other, t in self._tangents.items()
        )

    def _view_of_base_tangent(self, view: torch.Tensor) -> torch.Tensor | None:
        """The tangent of a view taken before its base became tangent-carrying in place."""
        base = view._base
        tb = self._tangents.get(base)
        if tb is None or tb is _REUSED or tuple(tb.stride()[1:]) != tuple(base.stride()):
            return None
        offset = tb.storage_offset() + view.storage_offset() - base.storage_offset()
        shape, strides = (self.count, *view.shape), (tb.stride(0), *view.stride())
        return tb.as_strided(shape, strides, offset)

    # ------------------------------------------------------------------ in-place writes

    def assign(self, x: torch.Tensor, value: torch.Tensor, tangent: torch.Tensor | None):
        """Write ``value`` and its ``tangent`` into ``x``, as an in-place operation does."""
        if self.is_parameter(x):
            raise Unsupported("an in-place operation on a parameter inside the closure")
        current = self.tangent(x)
        if tangent is None and current is None:
            x.copy_(value)
            return x
        if tangent is None:
            tangent = torch.zeros((self.count, *x.shape), dtype=x.dtype, device=x.device)
        target = self._write_target(x, current)
        x.copy_(value)
        if target is not None:
            target.copy_(tangent.expand(target.shape))
        else:  # x alone, and nothing views it: its tangent is replaced
            self.track(x, tangent.expand(self.count, *x.shape).clone(), fresh=True)
            self._written[x] = True
        return x

    def _write_target(self, x: torch.Tensor, current: torch.Tensor | None):
        """The tensor to write x's new tangent into, or None to rebind x's tangent."""
        base = x._base
        if base is None:
            if current is not None and self._writable(x, current, views_follow=True):
                return current
            if any(getattr(other, "_base", None) is x for other in self._tangents.keys()):
                raise Unsupported("an in-place write into a tensor whose views carry tangents")
            return None
        base_tangent = self.tangent(base)
        if base_tangent is None and base.is_contiguous():
            zeros = torch.zeros((self.count, *base.shape), dtype=base.dtype, device=base.device)
            self.track(base, zeros, fresh=True)
            self._written[base] = True
            view = self._view_of_base_tangent(x)
            self._tangents[x] = view
            return view
        shared = (
            current is not None
            and base_tangent is not None
            and self._writable(base, base_tangent, views_follow=True)
            and current.untyped_storage().data_ptr() == base_tangent.untyped_storage().data_ptr()
        )
        if not shared:
            raise Unsupported("an in-place write into a view whose tangent is not its base's")
        return current

    # ------------------------------------------------------------------ the dispatch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not (self.carries(args) or self.carries(kwargs)):
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "__get__":  # an attribute such as x.shape or x.T
            return self._attribute(func, args, kwargs)
        if name in _CONSTANT_RESULTS:
            return func(*args, **kwargs)
        if self._inside_custom_function():
            # Its derivative is its own jvp, not that of the operations in its forward.
            raise Unsupported("a custom torch.autograd.Function runs inside the closure")
        try:
            return self._apply(func, name, args, kwargs)
        except (Unsupported, torch.cuda.OutOfMemoryError, MemoryError):
            raise
        except Exception as error:  # a case nothing covers: the general path
            raise Unsupported(
                f"{name or func} failed in the stacked evaluation: {error}"
            ) from error

    def _apply(self, func, name, args, kwargs):
        composite = COMPOSITES.get(func)
        if composite is not None:  # no forward-mode formula: its composite, through this mode
            with self:
                return composite(*args, **kwargs)
        rule = RULES.get(func)
        if rule is not None and rule.in_place:  # it writes in place itself (relu)
            try:
                return self._rule(rule, func, args, kwargs)
            except Decline:
                pass
        in_place = out_of_place(func, args, kwargs)
        if in_place is not None:
            plain, plain_args, plain_kwargs = in_place
            value = self._apply(plain, getattr(plain, "__name__", name), plain_args, plain_kwargs)
            return self.assign(args[0], value, self.tangent(value))
        if name == "__setitem__":
            return self._setitem(func, *args)
        if rule is not None and not rule.in_place:
            try:
                return self._rule(rule, func, args, kwargs)
            except Decline:
                pass
        context = CONTEXTS.get(func)
        if context is not None:
            with context():
                return forward_ad_call(self, func, args, kwargs)
        return forward_ad_call(self, func, args, kwargs)

    def _rule(self, rule, func, args, kwargs):
        if self.check_rules:
            key = rule_check.signature(rule, args, kwargs)
            if key not in self._checked:
                self._checked.add(key)
                try:
                    rule_check.check_rule(self, rule, func, args, kwargs)
                except rule_check.RuleMismatch as error:
                    raise Unsupported(str(error)) from None
        return rule.apply(self, func, *args, **kwargs)

    def _attribute(self, func, args, kwargs):
        attribute = getattr(getattr(func, "__self__", None), "__name__", "")
        if attribute in ("T", "mT"):
            return self._rule(RULES[torch.Tensor.t], func, args, kwargs)
        if attribute in _ATTRIBUTES:
            return func(*args, **kwargs)
        return forward_ad_call(self, func, args, kwargs)

    def _setitem(self, func, x, index, value):
        """x[index] = value: the same elements of x's tangent take value's (0 for a constant)."""
        new = x.clone()
        tangent = self.tangent(x)
        tv = self.tangent(value)
        new_tangent = None
        if tangent is not None or tv is not None:
            new_tangent = (
                tangent.clone()
                if tangent is not None
                else torch.zeros((self.count, *x.shape), dtype=x.dtype, device=x.device)
            )
            index_tuple = index if isinstance(index, tuple) else (index,)
            new_tangent[(slice(None), *index_tuple)] = 0 if tv is None else tv
        func(new, index, value)
        self.assign(x, new, new_tangent)

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


# --------------------------------------------------------------------------------------------
# The evaluation


def stacked_derivatives(
    closure: Callable[[], torch.Tensor],
    source: TangentSource,
    reuse: bool = False,
    check_rules: bool = False,
    buffers: Iterable[torch.Tensor] = (),
) -> tuple[object, torch.Tensor | None, StackedTangents]:
    """Run ``closure`` once under ``StackedTangents`` and return its value and value's tangent.

    Call it under ``torch.no_grad()``. Parameter i moves along ``source(i)``; the tangent of the
    value (shape ``(K, *value.shape)``, or ``None`` when the value does not depend on the
    parameters) holds d_k = Σ_i ∇_i value · source(i)[k].

    Raises:
        Unsupported: the closure did something the stacked evaluation cannot follow.
        TangentReused: with ``reuse``, a relu input's tangent was read after relu reused it;
            the caller rewinds and runs again without ``reuse``.
    """
    mode = StackedTangents(source, reuse, check_rules, buffers)
    mode.boundary = sys._getframe()
    with mode, inject.evaluating(mode):
        value = closure()
        tangent = mode.tangent(value) if isinstance(value, torch.Tensor) else None
    return value, tangent, mode
