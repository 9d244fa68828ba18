"""The forward gradient (Baydin et al. 2022): g = Σ_k c_k v_k from K directional derivatives
d_k = ∇f·v_k computed exactly by forward-mode AD, never a backward pass."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from forwardgrad import tangents as tg
from forwardgrad.errors import ConfigurationError
from forwardgrad.estimators.base import WIRE_BYTES, Seeded, check_finite, trainable
from forwardgrad.estimators.grouped import grouped_estimate
from forwardgrad.estimators.guess import GUESSES, local_guess_estimate
from forwardgrad.estimators.tables import group_of_parameters, loss_groups
from forwardgrad.jvp import directional_derivatives
from forwardgrad.jvp.checks import check_value
from forwardgrad.seeds import draw_seed


def check_params(params: Mapping[str, torch.Tensor]) -> tuple[list[str], list[torch.Tensor]]:
    """Names and detached values of a functional ``params`` dict, checked."""
    if not isinstance(params, Mapping) or not params:
        raise TypeError("params must be a non-empty dict of name -> tensor.")
    for name, p in params.items():
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise TypeError(f"params[{name!r}] must be a floating-point tensor.")
    return list(params), [p.detach() for p in params.values()]


def forward_grad(
    fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    tangents: int = 1,
    distribution: str = "normal",
    combine: str = "mean",
    generator: torch.Generator | None = None,
    rank: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The forward gradient of ``fn`` at ``params`` (Baydin et al. 2022, Algorithm 1).

    g = Σ_k c_k v_k with d_k = ∇f·v_k from ``torch.func.jvp``; ``combine="mean"`` gives
    c = d / K, ``"projection"`` the unbiased scaled projection of ``tangents.combine``.

    Args:
      fn: maps a dict of tensors to a scalar tensor, built from operations with forward-mode
        derivatives, without side effects on tensors it does not receive.
      params: the point θ, a dict of name -> tensor.
      tangents: K, the number of random directions.
      distribution: ``"normal"``, ``"rademacher"`` or ``"orthogonal"``.
      combine: ``"mean"`` or ``"projection"``.
      generator: source of the tangents; ``None`` uses torch's global generator.
      rank: None (dense tangents) or r >= 1: the matrices' tangents are structured of rank r
        (``tangents.structured``), formed whole here.

    Returns:
      ``(value, grads)``: f(θ) detached and a dict of gradient estimates shaped like ``params``.
    """
    tg.check_count(tangents)
    tg.check_distribution(distribution)
    tg.check_combine(combine)
    tg.check_structured(rank, distribution, combine)
    names, values = check_params(params)
    directions = tg.sample_tangents(values, tangents, distribution, generator, rank)

    def f(*point):
        return fn(dict(zip(names, point)))

    derivatives = []
    with torch.no_grad():
        for k in range(tangents):
            value, derivative = torch.func.jvp(f, tuple(values), tuple(v[k] for v in directions))
            derivatives.append(check_value(derivative))
    value = check_value(value)
    derivatives = torch.stack(derivatives)
    check_finite(value, derivatives)
    return value, dict(zip(names, tg.combine(derivatives, directions, combine)))


class ForwardGradient(Seeded):
    """The forward gradient g = Σ_k c_k v_k from K directional derivatives by forward-mode AD.

    Each ``estimate`` draws K fresh tangents from this estimator's generator, evaluates the
    closure once on the derivative engine (``forwardgrad.jvp``: no graph is built and no
    backward pass runs) and combines the K derivatives d_k = ∇f·v_k:

    - ``combine="mean"``: g = (1/K) Σ d_k v_k. Unbiased; for K = 1 and Gaussian tangents
      E‖g‖² = (n + 2)‖∇f‖², for Rademacher n‖∇f‖² (n parameters); K tangents divide the
      covariance by K.
    - ``combine="projection"``: g = (n / rank B) · B (BᵀB)⁺ d, the orthogonal projection of
      ∇f onto the span of the tangents scaled to be unbiased; with K >= n it is ∇f exactly.

    ``.grad`` is overwritten, not accumulated. BatchNorm running statistics are updated once per
    estimate and Dropout draws one mask shared by the value and every tangent. After each
    estimate ``last_path`` says which derivative path ran (``"fast"``: one evaluation with the
    K tangents stacked; ``"general"``: PyTorch's dual tensors, one evaluation per tangent) and
    ``last_fallback`` why the general path ran, if it did; both give the same estimate for the
    same seed, to float rounding. With K = 1 each tangent is drawn straight into ``.grad``.

    Structured tangents (``rank=r``): each matrix parameter (two or more dims, viewed as
    ``shape[0]`` rows of the rest; min side above r) gets V_k = (1/√r) Σ_j a_kj b_kjᵀ, its
    factors drawn with the chosen distribution; vectors keep dense tangents. E[vec V vec Vᵀ]
    = I, so the estimate stays unbiased, and for K = 1

        E‖g‖² = n‖∇f‖² + Σ_b c_b ‖∇_b f‖²,   c_b = 2 + 2(m + n + 1)/r (normal), 2(1 − 1/r)
        (Rademacher) for an m × n matrix b; 2 and 0 for a dense block

    (derived in ``tangents.structured``). The fast path's rules take the factors: a linear
    layer's x V_kᵀ = (x B_k) A_kᵀ costs O(B·(m + n)·r) instead of O(B·m·n), and ``.grad``
    ← Σ_k c_k A_k B_kᵀ is one matrix product. Orthogonal tangents and the projection combiner
    are refused with structured tangents (see ``tangents.check_structured``).

    With local losses (a model that declares ``loss_groups``, e.g. ``LocalLosses``, and a
    closure that returns its table of losses) each block's parameters take their own block's
    derivatives d_l, not Σ_l d_l (``estimators.grouped``). ``guess="local"`` replaces the
    random tangents with each block's local-loss gradient and projects the model's own
    loss onto it (Fournier et al. 2023, ``estimators.guess``): deterministic and *biased*.

    Args:
      tangents: K >= 1.
      distribution: ``"normal"``, ``"rademacher"`` or ``"orthogonal"`` (K <= n).
      combine: ``"mean"`` or ``"projection"``.
      seed: seeds the tangents; the same seed reproduces the same estimates bit for bit.
        ``None`` draws a seed from torch's global generator.
      fast: try the fast path first (the default); False always takes the general path, for
        comparisons and debugging.
      rank: None (dense tangents, the default) or an integer r >= 1 (structured tangents).
      guess: ``None`` (random tangents) or ``"local"`` (local guesses; needs a model with local
        losses, K = 1, dense tangents, one process).
    """

    name = "forward"
    options = ("tangents", "distribution", "combine", "seed", "fast", "rank", "guess")

    def __init__(
        self,
        tangents: int = 1,
        distribution: str = "normal",
        combine: str = "mean",
        seed: int | None = None,
        fast: bool = True,
        rank: int | None = None,
        guess: str | None = None,
    ):
        self.tangents = tg.check_count(tangents)
        self.guess = _check_guess(guess, self.tangents)
        self.distribution = tg.check_distribution(distribution)
        self.combine = tg.check_combine(combine)
        self.rank = tg.check_structured(rank, self.distribution, self.combine)
        if self.guess is not None and self.rank is not None:
            raise ConfigurationError("guess='local' takes its directions whole; leave rank unset.")
        self.fast = bool(fast)
        super().__init__(seed)
        # K > 1: the tangent tensors of the last step, reused so that each step does not pay
        # the page faults of fresh multi-megabyte allocations.
        self._buffers: dict[int, torch.Tensor] = {}

    def describe(self) -> str:
        if self.guess is not None:
            return f"forward ({self.guess} guess)"
        structure = "" if self.rank is None else f", rank {self.rank}"
        return f"forward (K={self.tangents}, {self.distribution}, {self.combine}{structure})"

    def bytes_per_step(self, model: nn.Module) -> int:
        groups = loss_groups(model)
        rows = 1 if groups is None else len(groups)  # one per local loss
        return WIRE_BYTES * (self.tangents + 1) * rows  # each loss and its K derivatives

    def source(self, params: list[torch.Tensor]) -> tg.TangentSource:
        """This step's tangents for ``params``, drawn from this estimator's generator."""
        generator = self.generator(params[0].device)
        if not tg.DISTRIBUTIONS[self.distribution].streamable:
            drawn = tg.sample_tangents(params, self.tangents, self.distribution, generator)
            return tg.GivenTangents(params, drawn)
        seed = draw_seed(generator)
        if self.tangents == 1:
            return tg.GradTangents(params, self.distribution, seed, self.rank)
        return tg.HeldTangents(
            params, self.tangents, self.distribution, seed, self._buffers, self.rank
        )

    def estimate(self, model: nn.Module, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.guess == "local":
            return local_guess_estimate(self, model, closure)
        params = trainable(model)
        grouped = group_of_parameters(model, params)
        source = self.source(params)
        try:
            if grouped is not None:
                return grouped_estimate(self, model, closure, source, *grouped)
            loss, derivatives = self.derivatives(model, closure, source)
            source.write_grads(self.coefficients(derivatives, source))
        except BaseException:
            discard = getattr(source, "discard", None)
            if discard is not None:  # K = 1 drew tangents into .grad
                discard()
            raise
        return loss

    def derivatives(
        self, model: nn.Module, closure: Callable[[], torch.Tensor], source: tg.TangentSource
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss and d_k = ∇L·v_k for ``source``'s tangents, summed over the ranks of a
        data-parallel job, and checked to be finite."""
        result = directional_derivatives(model, closure, source, fast=self.fast)
        self.last_path, self.last_fallback = result.path, result.fallback
        local = torch.cat([result.value.reshape(1), result.derivatives.reshape(-1)])
        total = self.reduced(local, f"the all-reduce of the step's {local.numel()} numbers")
        loss, derivatives = total[0], total[1:]
        check_finite(loss, derivatives)
        return loss, derivatives

    def coefficients(self, derivatives: torch.Tensor, source: tg.TangentSource) -> torch.Tensor:
        """c such that the estimate is Σ_k c_k v_k."""
        if self.combine == "mean":
            return tg.mean_coefficients(derivatives)
        n = sum(p.numel() for p in source.params)
        return tg.projection_coefficients(derivatives, source.gram(), n)


def _check_guess(guess: str | None, tangents: int) -> str | None:
    if guess is not None and guess not in GUESSES:
        raise ConfigurationError(f"unknown guess {guess!r}; choose None or one of {GUESSES}.")
    if guess is not None and tangents != 1:
        raise ConfigurationError(
            f"guess={guess!r} takes one direction per block (its local gradient); "
            f"leave tangents at 1, got {tangents}."
        )
    return guess
