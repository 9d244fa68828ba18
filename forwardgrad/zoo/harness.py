"""Measure the forward gradient on one zoo case: exactness, the path it took, and its speed.

- ``check_exactness``: one K = 1 Rademacher ``ForwardGradient`` step, whose ``.grad`` is d·v,
  against d_exact·v with d_exact = ∇L·v from autograd. The signs of ``.grad`` are ±v, so the
  direction is read off the estimate itself, with no access to how the estimator draws it.
- ``time_steps``: the K = 1 forward-gradient step against a ``Backprop`` step, alternated in one
  process on one thread, the median over rounds.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

import forwardgrad as fg
from forwardgrad.zoo import diagnostics
from forwardgrad.zoo.registry import ZooCase, ZooInstance

try:  # The estimator evaluates attention with the math kernel; the reference does too, so
    # that dropout inside attention draws the same mask in both.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def _math_attention() -> contextlib.AbstractContextManager:
        return sdpa_kernel([SDPBackend.MATH])

except ImportError:  # pragma: no cover - older torch

    def _math_attention() -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


@dataclass(frozen=True)
class PathInfo:
    """Which path a forward-gradient step took: ``"fast"``, ``"general"`` or ``None`` (unknown);
    ``fallback`` says why it left the fast path (``None`` when it did not, or is unknown)."""

    path: str | None
    fallback: str | None


@dataclass(frozen=True)
class Exactness:
    """One forward-gradient step against autograd along the same direction.

    The direction is v = sign(g) for the estimate g = d·v: Rademacher signs up to one overall
    sign, which d and d_exact share (g = |d|·v). ``relative_error`` is ‖g − d_exact·v‖ /
    (‖∇L‖·‖v‖), which is |d − d_exact| / ‖∇L‖ when every |g_i| = |d| (a wrong magnitude in any
    entry counts too). It is relative to ‖∇L‖, the scale of
    d_exact over random directions (E[d_exact²] = ‖∇L‖²), not to |d_exact| itself: a direction
    nearly orthogonal to ∇L makes d_exact small by chance, and rounding then looks large
    beside it (|d_exact| = 0.002‖∇L‖ on one ViT). ``derivative`` (|d|, the mean |g_i|) and
    ``exact`` (∇L·v) are along that v. ``error`` is the estimator's exception on one line when
    the step failed (then the numbers are NaN).
    """

    case: str
    dtype: torch.dtype
    train: bool
    relative_error: float
    derivative: float
    exact: float
    gradient_norm: float
    path: PathInfo
    error: str | None = None


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _buffers_restorer(model: nn.Module) -> Callable[[], None]:
    saved = [(b, b.detach().clone()) for b in model.buffers()]

    def restore() -> None:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)

    return restore


def path_info(estimator: fg.ForwardGradient, instance: ZooInstance) -> PathInfo:
    """The path of ``estimator``'s last step on ``instance``: from ``last_path`` and
    ``last_fallback`` where the estimator has them, else from ``diagnostics``."""
    path = getattr(estimator, "last_path", None)
    if path is not None:
        return PathInfo(path, getattr(estimator, "last_fallback", None))
    blocker = diagnostics.fast_path_blocker(instance.model, instance.closure)
    general = diagnostics.took_general_path(estimator, instance.model)
    if blocker is None and general is None:
        return PathInfo(None, None)
    if blocker:
        return PathInfo("general", blocker)
    if general:
        return PathInfo("general", "the fast path's result disagreed with forward-mode AD")
    return PathInfo("fast", None)


def exact_gradients(instance: ZooInstance) -> list[torch.Tensor]:
    """∇L by autograd (zeros for parameters the loss does not use)."""
    params = trainable(instance.model)
    with torch.enable_grad(), _math_attention():
        loss = instance.closure()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def check_exactness(
    case: ZooCase,
    size: str = "small",
    dtype: torch.dtype = torch.float32,
    train: bool = True,
    seed: int = 0,
) -> Exactness:
    """One K = 1 Rademacher forward-gradient step against autograd along the same direction.

    The model, its batch, the Dropout masks and the BatchNorm statistics are the same for both
    (the global RNG is seeded before each and restored afterwards).
    """
    instance = case.instantiate(size, dtype, seed)
    model = instance.model.train(train)
    params = trainable(model)
    restore = _buffers_restorer(model)
    estimator = fg.ForwardGradient(1, "rademacher", seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            estimator.estimate(model, instance.closure)
        except Exception as error:  # the table reports it; the tests fail on it
            nan, path = math.nan, path_info(estimator, instance)
            failure = diagnostics.one_line(error)
            return Exactness(case.name, dtype, train, nan, nan, nan, nan, path, failure)
        estimate = [p.grad.detach().clone() for p in params]
        path = path_info(estimator, instance)
        restore()
        torch.manual_seed(seed)
        exact = exact_gradients(instance)
    return _compare(case.name, dtype, train, estimate, exact, path)


def _compare(name, dtype, train, estimate, exact, path) -> Exactness:
    """``estimate`` = d·v with Rademacher v against ``exact`` = ∇L along v = sign(estimate)."""
    estimate = [g.double().flatten() for g in estimate]
    exact = [g.double().flatten() for g in exact]
    signs = [torch.where(g >= 0, 1.0, -1.0).to(g) for g in estimate]  # a zero counts as +1
    n = sum(v.numel() for v in signs)
    d_exact = sum(float(g @ v) for g, v in zip(exact, signs))
    d_estimate = sum(float(g.abs().sum()) for g in estimate) / n
    residual = sum(float((g - d_exact * v).pow(2).sum()) for g, v in zip(estimate, signs))
    gradient_norm = math.sqrt(sum(float(g @ g) for g in exact))
    scale = gradient_norm * math.sqrt(n)
    relative = math.sqrt(residual) / scale if scale > 0 else math.sqrt(residual)
    return Exactness(name, dtype, train, relative, d_estimate, d_exact, gradient_norm, path)


@dataclass(frozen=True)
class Timing:
    """Seconds per step, medians over rounds. ``ratio`` is the median over rounds of the
    forward-gradient step's time ÷ the backprop step's time in the same round, with the quartiles
    of those per-round ratios as its spread (pairing by round cancels load that comes and goes)."""

    case: str
    forward: float
    forward_gradient: float
    backprop: float
    ratio: float
    ratio_low: float
    ratio_high: float
    path: PathInfo
    rank1: float = math.nan  # the same with rank-1 structured tangents (``rank=1``)
    rank1_ratio: float = math.nan
    rank1_low: float = math.nan
    rank1_high: float = math.nan


def _seconds(step: Callable[[], object], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def time_steps(
    case: ZooCase,
    size: str = "bench",
    dtype: torch.dtype = torch.float32,
    rounds: int = 7,
    seed: int = 0,
    min_seconds: float = 0.05,
) -> Timing:
    """The K = 1 Rademacher forward-gradient step, dense and with rank-1 structured tangents,
    against a backprop step, on one thread.

    The estimators fill ``.grad`` of the same model in train mode (no optimizer step). After a
    warm-up (which includes the forward gradient's first-use check), each round times both, in
    alternating order, each over enough steps to last about ``min_seconds``.
    """
    with threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        instance = case.instantiate(size, dtype, seed)
        model, closure = instance.model, instance.closure
        forward_gradient = fg.ForwardGradient(1, "rademacher", seed=seed)
        structured = fg.ForwardGradient(1, "rademacher", seed=seed, rank=1)
        backprop = fg.Backprop()

        def forward() -> None:
            with torch.no_grad():
                closure()

        steps = {
            "forward": forward,
            "fg": lambda: forward_gradient.estimate(model, closure),
            "rank1": lambda: structured.estimate(model, closure),
            "bp": lambda: backprop.estimate(model, closure),
        }
        for step in steps.values():  # warm-up: allocations, the first-use check
            step()
            step()
        repeats = {k: max(1, math.ceil(min_seconds / _seconds(s, 1))) for k, s in steps.items()}
        times: dict[str, list[float]] = {k: [] for k in steps}
        for r in range(rounds):
            order = list(steps) if r % 2 == 0 else list(reversed(steps))
            for key in order:
                times[key].append(_seconds(steps[key], repeats[key]))
        path = path_info(forward_gradient, instance)
    medians = {key: statistics.median(values) for key, values in times.items()}
    dense, rank1 = (_ratio_spread(times[key], times["bp"]) for key in ("fg", "rank1"))
    return Timing(
        case.name,
        medians["forward"],
        medians["fg"],
        medians["bp"],
        *dense,
        path,
        medians["rank1"],
        *rank1,
    )


def _ratio_spread(times: list[float], baseline: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios ``times / baseline``."""
    ratios = [t / b for t, b in zip(times, baseline)]
    low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return statistics.median(ratios), low, high
