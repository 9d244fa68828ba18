"""The table of stacked-tangent rules, and how a rule is registered for every spelling of its op.

A rule computes an operation's primal output with the intercepted function and records its
K tangents with ``mode.track``; it gets ``(mode, func, *args, **kwargs)``. ``rule(...)``
registers one for every way PyTorch spells the operation, so that ``torch.add(a, b)``,
``a.add(b)``, ``a + b`` and ``1 + a`` all find it:

- the function in ``torch``, the method on ``Tensor`` and the function in
  ``torch.nn.functional``, where they exist;
- the operator (``__add__``) and the reflected operator (``__radd__``, called with the operands
  swapped, so the rule sees them in mathematical order);
- the in-place forms (``add_``, ``__iadd__``, ``relu_``): the stacked evaluation runs the rule on
  the out-of-place form and writes the result and its tangent back into the mutated tensor.

Every rule names sample inputs (``samples``), and one table-driven test checks every registered
spelling against ``torch.func.jvp`` on them: a rule without a test cannot be registered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

# A sample is (args, kwargs); every floating-point tensor in it carries a tangent in the test,
# except the positions listed in ``constant`` (targets, running statistics).
Sample = tuple[tuple, dict]


@dataclass
class Rule:
    """One registered rule.

    Attributes:
        name: the operation's name, e.g. ``"add"``.
        apply: ``apply(mode, func, *args, **kwargs)`` -> the primal output (tangents tracked).
        samples: ``samples(dtype) -> iterable of (args, kwargs)`` for the table-driven test.
        spellings: every function this rule is registered for.
        constant: argument positions (ints) or keyword names whose tensors carry no tangent in
            the samples (class targets, running statistics).
        in_place: the rule handles the operation's in-place spellings itself (otherwise the
            stacked evaluation runs it out of place and writes the result back).
        structured: argument positions whose tangent the rule takes as the factors of a
            structured tangent when it has them (``mode.factors``; tested against the whole
            tangent they form).
    """

    name: str
    apply: Callable
    samples: Callable[[torch.dtype], Iterable[Sample]]
    spellings: list[Callable] = field(default_factory=list)
    constant: tuple = ()
    in_place: bool = False
    structured: tuple = ()

    @property
    def formula(self) -> str:
        doc = (self.apply.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


RULES: dict[Callable, Rule] = {}  # every spelling -> its rule
REGISTERED: list[Rule] = []  # each rule once, in registration order
IN_PLACE: dict[Callable, Callable] = {}  # an in-place spelling -> its out-of-place form

_OWNERS = (torch, torch.Tensor, F)


def spellings_of(name: str, operator: str | None = None, owners=_OWNERS) -> list[Callable]:
    """The functions that spell ``name``: ``torch.name``, ``Tensor.name``, ``F.name`` and, for an
    ``operator`` such as ``"add"``, ``Tensor.__add__``."""
    found: list[Callable] = []
    for owner in owners:
        f = getattr(owner, name, None)
        if callable(f) and f not in found:
            found.append(f)
    if operator is not None:
        f = getattr(torch.Tensor, f"__{operator}__", None)
        if f is not None and f not in found:
            found.append(f)
    return found


def _swapped(apply: Callable) -> Callable:
    """The rule for a reflected operator: ``b.__rsub__(a)`` is ``a - b`` with the operands in
    mathematical order; the primal is computed by the reflected function itself."""

    def reflected(mode, func, b, a, *args, **kwargs):
        return apply(mode, lambda x, y, *r, **k: func(y, x, *r, **k), a, b, *args, **kwargs)

    return reflected


def rule(
    *names: str,
    samples: Callable[[torch.dtype], Iterable[Sample]],
    operator: str | None = None,
    reflected: bool = False,
    functions: Iterable[Callable] = (),
    owners=_OWNERS,
    constant: tuple = (),
    in_place: bool = False,
    structured: tuple = (),
) -> Callable[[Callable], Callable]:
    """Register the decorated rule for every spelling of each of ``names``.

    Args:
        names: the operation's names (``"relu"``, ``"relu_"`` is found by itself).
        samples: sample inputs for the table-driven test (see ``Rule``).
        operator: the operator's dunder stem (``"add"`` for ``__add__``).
        reflected: also register ``__r<operator>__`` with its operands swapped.
        functions: further spellings that are not found by name (``F.max_pool2d_with_indices``).
        owners: where to look the names up (default: torch, Tensor, torch.nn.functional).
        constant, in_place, structured: see ``Rule``.
    """

    def register(apply: Callable) -> Callable:
        entry = Rule(names[0], apply, samples, constant=tuple(constant), in_place=in_place)
        entry.structured = tuple(structured)
        for name in names:
            for f in spellings_of(name, operator, owners):
                _add(entry, f, apply)
            for f in spellings_of(f"{name}_", None, owners):  # in-place forms
                for out_of_place in spellings_of(name, None, owners):
                    if getattr(out_of_place, "__name__", "") == name:
                        IN_PLACE.setdefault(f, out_of_place)
        if operator is not None:
            inplace = getattr(torch.Tensor, f"__i{operator}__", None)
            plain = getattr(torch.Tensor, f"__{operator}__", None)
            if inplace is not None and plain is not None:
                IN_PLACE.setdefault(inplace, plain)
            if reflected:
                f = getattr(torch.Tensor, f"__r{operator}__", None)
                if f is not None:
                    _add(entry, f, _swapped(apply))
        for f in functions:
            _add(entry, f, apply)
        REGISTERED.append(entry)
        return apply

    return register


def _add(entry: Rule, f: Callable, apply: Callable) -> None:
    if f in RULES:
        if RULES[f].name == entry.name:  # the same function under two names (F.relu_)
            return
        raise RuntimeError(f"two stacked-tangent rules for {f}")
    entry.spellings.append(f)
    RULES[f] = entry if apply is entry.apply else replace(entry, apply=apply, spellings=[f])


def lift(tangent: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a ``(K, *shape)`` tangent as ``(K, 1, ..., *shape)`` with ``ndim`` dims after K, so
    that it broadcasts against a tensor of ``ndim`` dims the way the primal did."""
    missing = ndim - (tangent.dim() - 1)
    if missing <= 0:
        return tangent
    return tangent.reshape(tangent.shape[0], *([1] * missing), *tangent.shape[1:])


def arg(args, kwargs, position: int, name: str, default=None):
    """Argument ``position`` of ``args`` (after the inputs), else ``kwargs[name]``."""
    if len(args) > position:
        return args[position]
    return kwargs.get(name, default)


def shaped(t: torch.Tensor, shape) -> torch.Tensor:
    """``t``, just computed, given ``shape`` in place rather than viewed."""
    if t.shape == tuple(shape):
        return t
    if t.is_contiguous() and not t._is_view():
        return t.resize_(shape)
    return t.reshape(shape)


def add_terms(*terms: torch.Tensor | None) -> torch.Tensor | None:
    """The sum of the terms that are not None (None if all are)."""
    total = None
    for term in terms:
        if term is not None:
            total = term if total is None else total + term
    return total


class Decline(Exception):
    """Raised by a rule, before any side effect, for a case it does not cover: the stacked
    evaluation then computes this call's tangents with PyTorch's own forward-mode formulas."""


def randn(*shape, dtype=torch.float64, positive: bool = False) -> torch.Tensor:
    """A sample tensor (values bounded away from 0 when ``positive``)."""
    t = torch.randn(*shape, dtype=dtype)
    return t.abs() + 0.5 if positive else t


def every_rule() -> Iterator[tuple[Callable, Rule]]:
    """Each registered spelling with its rule (for the table-driven test)."""
    yield from RULES.items()


# Activation-sized temporaries above this are computed a slice of the batch at a time.
TEMPORARY_BYTES = 32 * 2**20


def batch_slices(like: torch.Tensor, factor: int) -> list[slice]:
    """Slices of dim 0 of ``like`` such that ``factor`` times a slice of it fits
    ``TEMPORARY_BYTES`` (one slice, the whole batch, when all of it does)."""
    total = factor * like.numel() * like.element_size()
    pieces = min(-(-total // TEMPORARY_BYTES), like.shape[0])
    if pieces <= 1:
        return [slice(None)]
    size = -(-like.shape[0] // pieces)
    return [slice(start, start + size) for start in range(0, like.shape[0], size)]
