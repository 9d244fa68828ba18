"""Tangent sources: where each parameter's K tangents come from during one step.

The derivative engine asks a source for parameter i's tangents (``source(i)``, a tensor of shape
``(K, *shape)``) when the first operation that uses the parameter runs, and the estimator asks
it again to form the estimate Σ_k c_k v_k. Sources differ in what they keep in between:

- ``GradTangents`` (K = 1) draws each tangent into the parameter's ``.grad`` and scales it there,
  so the step holds no tangent beside the gradient it has to fill anyway;
- ``HeldTangents`` draws each parameter's K tangents once and keeps them for the estimate;
- ``DrawnTangents`` keeps nothing and draws again when asked again (``ForwardSGD``); a large
  matrix is drawn a block of rows at a time;
- ``GivenTangents`` holds tangents drawn elsewhere (orthogonal directions, which couple every
  parameter, or directions a caller chose).

Streamed sources (the first three) draw parameter i's tangent k from ``(seed, i, k)`` with
``tangents.streams``, so all three give the same numbers for the same seed. Given a ``rank``,
they give the matrices structured tangents V_k = A_k B_kᵀ (``tangents.structured``): rules
that can use the factors ask for them (``factors(i)``), the update adds them with ``addmm_``,
and only a rule or path that needs the whole tangent has it formed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from forwardgrad.tangents import streams, structured
from forwardgrad.tangents.combiners import gram_matrix


def _grad_buffer_ok(p: torch.Tensor) -> bool:
    g = p.grad
    return (
        g is not None
        and g.shape == p.shape
        and g.dtype == p.dtype
        and g.device == p.device
        and g.is_contiguous()
    )


def _write_grad(p: torch.Tensor, value: torch.Tensor) -> None:
    if _grad_buffer_ok(p):
        p.grad.copy_(value)
    else:
        p.grad = value.to(device=p.device, dtype=p.dtype).contiguous()


class TangentSource:
    """The K tangents of each of ``params`` for one step (see the module docstring).

    Attributes:
        params: the parameters that carry tangents, in a fixed order.
        count: K.
        keeps: asking again returns the tensor it returned before (no new draw, no new memory).
        rank: None, or r: the matrices' tangents are structured of rank r (``factors``).
    """

    keeps = True
    rank: int | None = None

    def __init__(self, params: Sequence[torch.Tensor], count: int) -> None:
        self.params, self.count = list(params), count

    def __call__(self, index: int) -> torch.Tensor:
        """Parameter ``index``'s K tangents, shape ``(K, *shape)``."""
        raise NotImplementedError

    def row_blocks(self, index: int) -> Iterator[tuple[int, int, torch.Tensor]] | None:
        """``(start, stop, tangents[:, start:stop])`` in row order when this source draws
        parameter ``index`` a block of rows at a time, else ``None``."""
        return None

    def factors(self, index: int) -> structured.Factors | None:
        """``(A, B)``, A of shape (K, m, r) and B (K, n, r), when parameter ``index``'s tangents
        are structured, V_k = A_k B_kᵀ over the parameter viewed as m × n
        (``tangents.structured``); else ``None``."""
        return None

    def dense(self) -> list[torch.Tensor]:
        """Every parameter's tangents, whole."""
        return [self(i) for i in range(len(self.params))]

    def gram(self) -> torch.Tensor:
        """BᵀB over all parameters (K x K, float64), for the projection combiner."""
        return gram_matrix(self.dense())

    def accumulate(
        self, index: int, out: torch.Tensor, coefficients: Sequence[float], alpha: float = 1.0
    ) -> None:
        """``out += alpha · Σ_k c_k v_k`` for parameter ``index``, in place."""
        v = self(index)
        for k, c in enumerate(coefficients):
            out.add_(v[k], alpha=alpha * c)

    def write_grads(self, coefficients: torch.Tensor) -> None:
        """``.grad`` of parameter i ← Σ_k c_k v_k, for every parameter (overwritten)."""
        for i, p in enumerate(self.params):
            v = self(i)
            c = coefficients.to(device=v.device, dtype=v.dtype)
            _write_grad(p, torch.tensordot(c, v, dims=1))


class StreamedSource(TangentSource):
    """Tangents drawn from the step's ``seed`` with ``tangents.streams`` (normal, rademacher);
    with ``rank``, structured ones for the matrices (their factors, (m + n)·r·K numbers a
    parameter, are kept once drawn)."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        count: int,
        distribution: str,
        seed: int,
        rank: int | None = None,
    ) -> None:
        super().__init__(params, count)
        self.distribution, self.seed = distribution, seed
        self.rank = structured.check_structured(rank, distribution)
        self._factors: dict[int, structured.Factors] = {}

    def factors(self, index: int) -> structured.Factors | None:
        if index not in self._factors:
            p = self.params[index]
            if not structured.is_structured(p, self.rank):
                return None
            self._factors[index] = structured.parameter_factors(
                p, self.count, self.distribution, self.seed, index, self.rank
            )
        return self._factors[index]

    def draw(self, index: int) -> torch.Tensor:
        """Parameter ``index``'s K tangents, drawn afresh (structured ones formed whole)."""
        factors = self.factors(index)
        if factors is not None:
            return structured.materialise(factors, self.params[index].shape)
        return streams.parameter_tangents(
            self.params[index], self.count, self.distribution, self.seed, index
        )

    def accumulate(
        self, index: int, out: torch.Tensor, coefficients: Sequence[float], alpha: float = 1.0
    ) -> None:
        factors = self.factors(index)
        if factors is None:
            return super().accumulate(index, out, coefficients, alpha)
        structured.add_combination(out, factors, coefficients, alpha)

    def write_grads(self, coefficients: torch.Tensor) -> None:
        """As ``TangentSource.write_grads``; a structured tangent's combination is one matrix
        product written into ``.grad``, its tangents never formed."""
        for i, p in enumerate(self.params):
            factors = self.factors(i)
            if factors is None:
                v = self(i)
                _write_grad(p, torch.tensordot(coefficients.to(v.device, v.dtype), v, dims=1))
                continue
            if not _grad_buffer_ok(p):
                p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
            structured.write_combination(p.grad, factors, coefficients)


class DrawnTangents(StreamedSource):
    """Keeps no tangent: each request draws it again. A matrix larger than ``streams.CHUNK``
    values is drawn a block of rows at a time (``row_blocks``) by the rules that can use it,
    so that the step never holds more of its tangent than one block."""

    keeps = False

    def __call__(self, index: int) -> torch.Tensor:
        return self.draw(index)

    def row_blocks(self, index: int) -> Iterator[tuple[int, int, torch.Tensor]] | None:
        p = self.params[index]
        if p.dim() < 2 or p.numel() <= streams.CHUNK or self.factors(index) is not None:
            return None  # cheaper drawn whole, or structured (the rules take the factors)
        return streams.parameter_row_blocks(p, self.count, self.distribution, self.seed, index)

    def accumulate(
        self, index: int, out: torch.Tensor, coefficients: Sequence[float], alpha: float = 1.0
    ) -> None:
        if self.factors(index) is not None:  # one addmm_, no tangent formed
            return super().accumulate(index, out, coefficients, alpha)
        blocks = self.row_blocks(index)
        if blocks is not None:  # a block of rows at a time, never the whole tangent
            for start, stop, v in blocks:
                for k, c in enumerate(coefficients):
                    out[start:stop].add_(v[k], alpha=alpha * c)
            return
        p = self.params[index]
        tangent = torch.empty_like(p, memory_format=torch.contiguous_format)
        for k, c in enumerate(coefficients):  # one tangent at a time
            streams.fill_tangent(tangent, self.distribution, self.seed, index, k)
            out.add_(tangent, alpha=alpha * c)


class HeldTangents(StreamedSource):
    """Draws each parameter's K tangents once and keeps them for the estimate.

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
        rank: int | None = None,
    ) -> None:
        super().__init__(params, count, distribution, seed, rank)
        self.held: dict[int, torch.Tensor] = {}
        self.buffers = {} if buffers is None else buffers

    def __call__(self, index: int) -> torch.Tensor:
        if index not in self.held:
            factors = self.factors(index)
            if factors is not None:  # formed only for a rule or path that needs it whole
                self.held[index] = structured.materialise(factors, self.params[index].shape)
                return self.held[index]
            p, buffer = self.params[index], self.buffers.get(index)
            shape = (self.count, *p.shape)
            if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != (
                shape,
                p.dtype,
                p.device,
            ):
                buffer = self.buffers[index] = torch.empty(shape, dtype=p.dtype, device=p.device)
            for k in range(self.count):
                streams.fill_tangent(buffer[k], self.distribution, self.seed, index, k)
            self.held[index] = buffer
        return self.held[index]


class GradTangents(StreamedSource):
    """K = 1: each tangent is drawn into the parameter's ``.grad``, then scaled there by the
    coefficient, so the step holds no tangent beside the gradient it has to fill anyway."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        distribution: str,
        seed: int,
        rank: int | None = None,
    ) -> None:
        super().__init__(params, 1, distribution, seed, rank)
        self.drawn: set[int] = set()
        self.had_grad = [p.grad is not None for p in self.params]

    def __call__(self, index: int) -> torch.Tensor:
        p = self.params[index]
        if not _grad_buffer_ok(p):
            p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
        if index not in self.drawn:
            factors = self.factors(index)
            if factors is not None:
                structured.write_combination(p.grad, factors, [1.0])
            else:
                streams.fill_tangent(p.grad, self.distribution, self.seed, index, 0)
            self.drawn.add(index)
        return p.grad.unsqueeze(0)

    def write_grads(self, coefficients: torch.Tensor) -> None:
        """``.grad`` ← c v, in place (parameters the loss never used get their v drawn now).
        A structured tangent is written as c A Bᵀ from its factors even where a rule drew it
        whole, so that the bits of the step do not depend on which derivative path ran (the
        first step in a process checks the fast path against the general one, and a resumed
        run must end with exactly the parameters of an uninterrupted one)."""
        scale = float(coefficients.reshape(-1)[0])
        for i, p in enumerate(self.params):
            factors = self.factors(i)
            if factors is not None:
                if not _grad_buffer_ok(p):
                    p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
                structured.write_combination(p.grad, factors, [scale])
                continue
            self(i)[0].mul_(scale)

    def discard(self) -> None:
        """Undo the draws into ``.grad`` (the step failed): ``.grad`` is left as ``None`` where
        there was none, else zero."""
        for p, had in zip(self.params, self.had_grad):
            if not had:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        self.drawn.clear()


class GivenTangents(TangentSource):
    """Tangents drawn elsewhere: one ``(K, *shape)`` tensor per parameter."""

    def __init__(self, params: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor]) -> None:
        super().__init__(params, tangents[0].shape[0])
        self.tangents = list(tangents)

    def __call__(self, index: int) -> torch.Tensor:
        return self.tangents[index]
