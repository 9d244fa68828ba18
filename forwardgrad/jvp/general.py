"""The general path: the closure evaluated on PyTorch's dual tensors, once per tangent.

Parameter i becomes θ_i + ε v_i (``torch.autograd.forward_ad``), and one evaluation gives the
loss and ∇L·v. K tangents take K evaluations, each rewound (``Replay``) so that together they
count as one forward: BatchNorm's statistics are updated once and Dropout draws one mask.

Why not ``torch.func.jvp`` over ``functional_call``? Two measurements decided it:

- ``torch.func.jvp`` refuses a closure that mutates a tensor it did not receive as an input,
  and every BatchNorm in training mode does (``running_mean``, ``num_batches_tracked``); an
  integer buffer cannot be passed as a ``jvp`` input either, since it cannot carry a tangent.
- ``functional_call`` replaces every parameter for the whole call, so every parameter's tangent
  is alive at once. ``DualParameters`` makes a parameter dual only for the operation that uses
  it, so a source that draws tangents on demand keeps one parameter's tangent at a time, and
  the first-use check of the fast path does not raise the step's peak memory.

Parameters are found by identity, so tied weights share one tangent, and references the
closure captured before the call (``params = list(model.parameters())`` for a penalty) are
dual as well.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from forwardgrad.jvp import inject
from forwardgrad.jvp.replay import Replay
from forwardgrad.jvp.routes import COMPOSITES, CONTEXTS
from forwardgrad.tangents.sources import TangentSource


class DualParameters(TorchFunctionMode):
    """Hands every operation the dual tensor θ_i + ε·source(i)[k] in place of parameter i."""

    def __init__(self, source: TangentSource, k: int, keep: bool):
        super().__init__()
        self.source, self.k, self.keep = source, k, keep
        self._index = {id(p): i for i, p in enumerate(source.params)}
        self._duals: dict[int, torch.Tensor] = {}

    def _dual(self, value):
        if not isinstance(value, torch.Tensor):
            return value
        index = self._index.get(id(value))
        if index is None:
            return value
        dual = self._duals.get(index)
        if dual is None:
            dual = fwAD.make_dual(value.detach(), self.source(index)[self.k])
            if self.keep:  # the source holds the tangent anyway: reuse the dual
                self._duals[index] = dual
        return dual

    @property
    def count(self) -> int:
        return self.source.count

    def add_tangent(self, value: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
        """The dual tensor with ``value``'s primal and tangent ż + u[k] (``jvp.inject``)."""
        primal, current = fwAD.unpack_dual(value)
        added = tangent[self.k] if current is None else current + tangent[self.k]
        return fwAD.make_dual(primal, added)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        args, kwargs = tree_map(self._dual, (args, kwargs or {}))
        composite = COMPOSITES.get(func)
        if composite is not None:
            return composite(*args, **kwargs)
        context = CONTEXTS.get(func)
        if context is not None:
            with context():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def dual_evaluation(
    closure: Callable[[], object], source: TangentSource, k: int
) -> tuple[object, torch.Tensor | None]:
    """The closure's value and its tangent along tangent k of ``source``, by dual tensors."""
    dual = DualParameters(source, k, source.keeps)
    with fwAD.dual_level(), dual, inject.evaluating(dual):
        value = closure()
        tangent = fwAD.unpack_dual(value).tangent if isinstance(value, torch.Tensor) else None
    return value, tangent  # the value is a plain tensor once its level has closed


def general_derivatives(
    closure: Callable[[], object],
    source: TangentSource,
    replay: Replay,
    count: int | None = None,
) -> tuple[object, torch.Tensor | None]:
    """The closure's value and the stacked tangents of its value, ``(K, *value.shape)``.

    Tangent k is evaluated after rewinding to ``replay``, so the K evaluations count as one
    forward (``count``: only the first ``count`` tangents). The tangent is ``None`` when the
    value does not depend on the parameters.
    """
    value, tangents = None, []
    for k in range(source.count if count is None else count):
        if k > 0:
            replay.rewind()
        value, tangent = dual_evaluation(closure, source, k)
        if not isinstance(value, torch.Tensor):
            return value, None
        tangents.append(tangent)
    if all(t is None for t in tangents):
        return value, None
    return value, torch.stack([torch.zeros_like(value) if t is None else t for t in tangents])


def locate_failure(model: nn.Module, run: Callable[[], object]) -> str | None:
    """Re-run ``run`` with hooks that track the executing module; name the one that failed."""
    names = {id(m): (name or type(m).__name__) for name, m in model.named_modules()}
    stack: list[str] = []
    failed: list[str] = []

    def enter(module, args):
        if id(module) in names:
            stack.append(f"{names[id(module)]} ({type(module).__name__})")

    def leave(module, args, output):
        if id(module) in names and stack:
            stack.pop()

    pre = nn.modules.module.register_module_forward_pre_hook(enter)
    post = nn.modules.module.register_module_forward_hook(leave)
    try:
        run()
    except Exception:
        failed.extend(stack[-1:])
    finally:
        pre.remove()
        post.remove()
    return failed[0] if failed else None
