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

Bounded memory (``block_values``, what the fast path's first-use check asks for): a linear
layer whose weight is a parameter runs a block of output features at a time, each block by
PyTorch's own formula. Whole, a layer holds its weight's whole tangent and three output-sized
temporaries of the formula (ẋWᵀ, xẆᵀ, their sum) beside its output: on a deep MLP (width 1024,
batch 1024) that set the first step's peak at 1.7 times the fast path's. By blocks, the weight's
tangent is drawn (or formed from its factors) a block of rows at a time and the formula's
temporaries are one block's size, so the general path's peak is the fast path's; it costs the
general path about a third more time (thin matrix products), which only the check pays.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from forwardgrad.jvp import inject
from forwardgrad.jvp.replay import Replay
from forwardgrad.jvp.routes import COMPOSITES, CONTEXTS
from forwardgrad.tangents import structured
from forwardgrad.tangents.sources import TangentSource

# The first-use check's bound: at most this many values in a block of a linear layer's output
# (128 KiB in float32; 256 KiB blocks left the first step 12% above the later ones).
BLOCK_VALUES = 1 << 15


class DualParameters(TorchFunctionMode):
    """Hands every operation the dual tensor θ_i + ε·source(i)[k] in place of parameter i;
    with ``block_values``, linear layers run by blocks of at most that many output values."""

    def __init__(self, source: TangentSource, k: int, keep: bool, block_values: int | None = None):
        super().__init__()
        self.source, self.k, self.keep = source, k, keep
        self.block_values = block_values
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
        if func is F.linear and self.block_values is not None:
            blocked = self._blocked_linear(*_linear_arguments(args, kwargs or {}))
            if blocked is not None:
                return blocked
        args, kwargs = tree_map(self._dual, (args, kwargs or {}))
        composite = COMPOSITES.get(func)
        if composite is not None:
            return composite(*args, **kwargs)
        context = CONTEXTS.get(func)
        if context is not None:
            with context():
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    def _blocked_linear(self, x, weight, bias=None):
        """``F.linear(x, weight, bias)`` on dual tensors a block of output features at a time,
        each block by PyTorch's formula; ``None`` where the weight is no parameter or the output
        fits in one block (the call then runs whole)."""
        index = self._index.get(id(weight)) if isinstance(weight, torch.Tensor) else None
        if index is None or weight.dim() != 2 or not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        values = x.numel() // max(x.shape[-1], 1) * weight.shape[0]
        if x is weight or values <= self.block_values:
            return None
        rows = max(1, self.block_values * weight.shape[0] // values)
        x, bias = self._dual(x), self._dual(bias)
        primal = tangent = None
        for start, stop, rows_tangent in self._weight_tangent_rows(index, weight, rows):
            # A copy: a view's dual gets a tangent the size of its base, the whole weight.
            block = fwAD.make_dual(weight[start:stop].clone(), rows_tangent)
            part = F.linear(x, block, None if bias is None else bias[start:stop])
            part_primal, part_tangent = fwAD.unpack_dual(part)
            if primal is None:  # the dtype the call gives (autocast may change it)
                primal = part_primal.new_empty((*part_primal.shape[:-1], weight.shape[0]))
                tangent = torch.empty_like(primal)
            primal[..., start:stop] = part_primal
            tangent[..., start:stop] = part_tangent
        return fwAD.make_dual(primal, tangent)

    def _weight_tangent_rows(self, index, weight, rows):
        """``(start, stop, rows start:stop of tangent k)`` of parameter ``index``, ``rows`` rows
        at a time: formed from the factors of a structured tangent, cut from the source's row
        blocks when it draws by blocks, else cut from the whole tangent."""
        k, factors = self.k, self.source.factors(index)
        blocks = None if factors is not None else self.source.row_blocks(index)
        if blocks is None:
            whole = None if factors is not None else self.source(index)
            blocks = [(0, weight.shape[0], whole)]
        for first, last, block in blocks:
            for start in range(first, last, rows):
                stop = min(last, start + rows)
                if factors is None:
                    yield start, stop, block[k, start - first : stop - first]
                    continue
                a, b = factors[0][k : k + 1, start:stop], factors[1][k : k + 1]
                yield start, stop, structured.materialise((a, b), (stop - start, b.shape[1]))[0]


def _linear_arguments(args, kwargs) -> tuple:
    """``(input, weight, bias)`` of a call to ``F.linear``."""
    names = ("input", "weight", "bias")
    found = dict(zip(names, args), **kwargs)
    return tuple(found.get(name) for name in names)


def dual_evaluation(
    closure: Callable[[], object], source: TangentSource, k: int, block_values: int | None = None
) -> tuple[object, torch.Tensor | None]:
    """The closure's value and its tangent along tangent k of ``source``, by dual tensors
    (``block_values``: linear layers by blocks, see the module docstring)."""
    dual = DualParameters(source, k, source.keeps, block_values)
    with fwAD.dual_level(), dual, inject.evaluating(dual):
        value = closure()
        tangent = fwAD.unpack_dual(value).tangent if isinstance(value, torch.Tensor) else None
    return value, tangent  # the value is a plain tensor once its level has closed


def general_derivatives(
    closure: Callable[[], object],
    source: TangentSource,
    replay: Replay,
    count: int | None = None,
    block_values: int | None = None,
) -> tuple[object, torch.Tensor | None]:
    """The closure's value and the stacked tangents of its value, ``(K, *value.shape)``.

    Tangent k is evaluated after rewinding to ``replay``, so the K evaluations count as one
    forward (``count``: only the first ``count`` tangents). The tangent is ``None`` when the
    value does not depend on the parameters. ``block_values``: bound the memory of linear
    layers (see the module docstring).
    """
    value, tangents = None, []
    for k in range(source.count if count is None else count):
        if k > 0:
            replay.rewind()
        value, tangent = dual_evaluation(closure, source, k, block_values)
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
