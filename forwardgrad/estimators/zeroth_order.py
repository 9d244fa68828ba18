"""Zeroth-order (SPSA) estimates from loss values only (Spall 1992; Malladi et al. 2023, MeZO):

    g = (1/K) Σ_k [f(θ + ε z_k) − f(θ − ε z_k)] / (2ε) · z_k,

biased by O(ε²) on smooth f. The module form perturbs the parameters in place and regenerates
each z_k from a per-step seed whenever it is needed, so no perturbation is ever stored whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from forwardgrad import tangents as tg
from forwardgrad.errors import ConfigurationError
from forwardgrad.estimators.base import WIRE_BYTES, Seeded, check_finite, trainable
from forwardgrad.estimators.forward import check_params
from forwardgrad.jvp.checks import check_value, guarded
from forwardgrad.jvp.replay import Replay
from forwardgrad.seeds import derive_seed, draw_seed, seeded_generator


def check_zeroth_order_args(tangents: int, eps: float, distribution: str) -> None:
    tg.check_count(tangents)
    tg.check_distribution(distribution, tg.STREAMABLE)
    if (
        isinstance(eps, bool)
        or not isinstance(eps, (int, float))
        or not math.isfinite(eps)
        or eps <= 0
    ):
        raise ConfigurationError(f"eps must be a positive finite number (e.g. 1e-3), got {eps!r}.")


def central_differences(
    evaluate: Callable[[int, float], torch.Tensor], count: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and the K central differences [f(θ + ε z_k) − f(θ − ε z_k)] / (2ε).

    ``evaluate(k, sign)`` returns f(θ + sign·ε z_k); the loss is the mean of the 2K values,
    L(θ) + O(ε²).
    """
    differences, total = [], 0.0
    for k in range(count):
        plus, minus = evaluate(k, 1.0), evaluate(k, -1.0)
        differences.append((plus - minus) / (2 * eps))
        total = total + (plus + minus) / 2
    return total / count, torch.stack(differences)


def zeroth_order_grad(
    fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    tangents: int = 1,
    eps: float = 1e-3,
    distribution: str = "normal",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The SPSA estimate of ``fn`` at ``params``, evaluated out of place.

    Returns:
      ``(value, grads)``: the mean of f(θ ± ε z_k), detached, and a dict of estimates.
    """
    check_zeroth_order_args(tangents, eps, distribution)
    names, values = check_params(params)
    directions = tg.sample_tangents(values, tangents, distribution, generator)

    def evaluate(k: int, sign: float) -> torch.Tensor:
        point = {n: p + sign * eps * v[k] for n, p, v in zip(names, values, directions)}
        return check_value(fn(point))

    with torch.no_grad():
        value, derivatives = central_differences(evaluate, tangents, eps)
    check_finite(value, derivatives)
    return value, dict(zip(names, tg.combine(derivatives, directions, "mean")))


class ZerothOrder(Seeded):
    """Two-point SPSA from loss values only, memory-lean as in MeZO (Malladi et al. 2023).

    g = (1/K) Σ_k [L(θ + ε z_k) − L(θ − ε z_k)] / (2ε) · z_k. Each z_k is regenerated from a
    per-step seed whenever it is needed, and parameters are perturbed in place, so no
    perturbation is ever stored whole: memory is that of inference plus ``.grad``. The
    parameters are put back by the reverse in-place steps, which restores them to within
    floating-point rounding (a few ulps), not bit for bit. Both evaluations of a tangent see the
    same Dropout mask; BatchNorm statistics are updated once per estimate. The returned loss is
    the mean of the 2K evaluated losses, which is L(θ) + O(ε²).

    Args:
      tangents: K >= 1 perturbations averaged.
      eps: ε > 0, the perturbation size; the bias shrinks as ε² on smooth losses.
      distribution: ``"normal"`` or ``"rademacher"``.
      seed: as for ``ForwardGradient``.
    """

    name = "zeroth-order"
    options = ("tangents", "eps", "distribution", "seed")

    def __init__(
        self,
        tangents: int = 1,
        eps: float = 1e-3,
        distribution: str = "normal",
        seed: int | None = None,
    ):
        check_zeroth_order_args(tangents, eps, distribution)
        self.tangents, self.eps, self.distribution = tangents, float(eps), distribution
        super().__init__(seed)

    def describe(self) -> str:
        return f"zeroth-order (K={self.tangents}, {self.distribution}, eps={self.eps:g})"

    def bytes_per_step(self, model: nn.Module) -> int:
        return WIRE_BYTES * 2 * self.tangents  # one loss value per evaluation

    def _perturbations(self, params: Sequence[torch.Tensor], seed: int) -> Iterator[torch.Tensor]:
        generator = seeded_generator(seed, params[0].device)
        for p in params:
            yield tg.sample_tangents([p], 1, self.distribution, generator)[0][0]

    def _shift(self, params: Sequence[torch.Tensor], seed: int, scale: float) -> None:
        for p, z in zip(params, self._perturbations(params, seed)):
            p.add_(z, alpha=scale)

    def estimate(self, model: nn.Module, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        params = trainable(model)
        base = draw_seed(self.generator(params[0].device))
        seeds = [derive_seed(base, k) for k in range(self.tangents)]
        closure, replay = guarded(closure), Replay(model)
        shifted = {"k": 0, "offset": 0.0, "evaluations": 0}  # where the parameters stand now

        def evaluate(k: int, sign: float) -> torch.Tensor:
            if k != shifted["k"] and shifted["offset"]:  # the previous tangent's shift, undone
                self._shift(params, seeds[shifted["k"]], -shifted["offset"])
                shifted["offset"] = 0.0
            shifted["k"] = k
            self._shift(params, seeds[k], sign * self.eps - shifted["offset"])
            shifted["offset"] = sign * self.eps
            if shifted["evaluations"]:  # every evaluation counts as the first forward
                replay.rewind()
            shifted["evaluations"] += 1
            local = check_value(closure()).detach()
            return self.reduced(local.reshape(1), "the all-reduce of a loss value")[0]

        with torch.no_grad():
            try:
                loss, derivatives = central_differences(evaluate, self.tangents, self.eps)
            finally:  # back to θ, to within rounding
                if shifted["offset"]:
                    self._shift(params, seeds[shifted["k"]], -shifted["offset"])
            check_finite(loss, derivatives)
            coefficients = tg.mean_coefficients(derivatives).tolist()
            for p in params:
                if p.grad is None or p.grad.shape != p.shape:
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad.zero_()
            for c, seed in zip(coefficients, seeds):
                for p, z in zip(params, self._perturbations(params, seed)):
                    p.grad.add_(z, alpha=c)
        return loss
