"""ForwardSGD: forward-gradient descent in place, holding neither ``.grad`` nor a whole tangent.

Baydin et al. 2022, Algorithm 1, for each step:

    v_1..v_K ~ p(v),   d_k = ∇L(θ)·v_k (forward-mode AD),   θ ← θ − (η/K) Σ_k d_k v_k.

Each parameter's tangents are a pure function of the step's seed and the parameter's position
(``tangents.parameter_tangents``). They are drawn when the parameter's layer runs (the derivative
engine's fast path) and dropped after it; once the d_k are known each v_k is drawn again, one
parameter at a time, and added to the parameter in place; a weight or embedding table above
``tangents.CHUNK`` values is drawn a block of rows at a time, in both places. So the step's
memory is that of inference plus one small parameter's tangents or one block, as for MeZO's
zeroth-order SGD (Malladi et al. 2023), but with exact directional derivatives. With structured
tangents (``rank=r``) a matrix's tangents are their factors, V_k = A_k B_kᵀ, and the update is
one ``addmm_`` (``addr_`` for K = r = 1) into the parameter: no tangent of a matrix is formed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from forwardgrad import tangents as tg
from forwardgrad.errors import ConfigurationError
from forwardgrad.estimators.base import Wrapper, trainable
from forwardgrad.estimators.forward import ForwardGradient
from forwardgrad.seeds import draw_seed


class ForwardSGD(Wrapper, torch.optim.Optimizer):
    """Plain SGD on forward gradients, applied in place: ``loss = opt.step(closure)``.

    θ ← θ − η · (1/K) Σ_k d_k v_k with d_k = ∇L·v_k; see the module docstring for the memory
    argument. ``closure()`` returns the scalar loss computed with ``model`` and must not call
    ``backward()``. BatchNorm statistics are updated once per step and Dropout draws one mask.
    When the fast path cannot run the model, the step takes the general forward-mode path, which
    holds one parameter's whole tangent at a time. ``last_path`` and ``last_fallback`` say which
    path the latest step took, as for ``ForwardGradient``.

    It is a ``torch.optim.Optimizer``: learning-rate schedulers work on it, and ``state_dict``
    carries the tangent generator's state, so a resumed run draws the same tangents.

    Args:
      model: the ``nn.Module`` whose trainable parameters are updated.
      lr: η > 0.
      tangents: K >= 1 directions averaged per step.
      distribution: ``"normal"`` or ``"rademacher"``.
      seed: seeds the tangents; ``None`` draws one from torch's global generator.
      fast: as for ``ForwardGradient``.
      rank: None (dense tangents) or r >= 1, structured tangents as for ``ForwardGradient``
        (the same step for the same seed).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        tangents: int = 1,
        distribution: str = "normal",
        seed: int | None = None,
        fast: bool = True,
        rank: int | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"ForwardSGD takes the model, not {type(model).__name__}: it runs the closure "
                "with the model's parameters carrying tangents, e.g. ForwardSGD(model, lr=1e-3)."
            )
        number = isinstance(lr, (int, float)) and not isinstance(lr, bool)
        if not number or not math.isfinite(lr) or lr <= 0:
            raise ConfigurationError(
                f"lr must be a positive finite number (e.g. 1e-3), got {lr!r}."
            )
        tg.check_distribution(distribution, tg.STREAMABLE)
        params = trainable(model)
        super().__init__(params, {"lr": float(lr)})
        self.model = model
        self.estimator = ForwardGradient(tangents, distribution, "mean", seed, fast, rank)

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """One forward-gradient step; returns the loss before the update, detached."""
        if closure is None:
            raise ValueError(
                "ForwardSGD.step needs the closure: loss = opt.step(closure), where closure() "
                "returns the loss computed with the model, without calling backward()."
            )
        params = [p for group in self.param_groups for p in group["params"]]
        rates = [group["lr"] for group in self.param_groups for _ in group["params"]]
        estimator = self.estimator
        seed = draw_seed(estimator.generator(params[0].device))
        source = tg.DrawnTangents(
            params, estimator.tangents, estimator.distribution, seed, estimator.rank
        )
        loss, derivatives = estimator.derivatives(self.model, closure, source)
        coefficients = tg.mean_coefficients(derivatives).tolist()
        with torch.no_grad():
            for index, (p, lr) in enumerate(zip(params, rates)):
                source.accumulate(index, p, coefficients, alpha=-lr)
        return loss

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["tangents"] = self.estimator.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        tangents = state_dict.pop("tangents", None)
        super().load_state_dict(state_dict)
        if tangents is not None:
            self.estimator.load_state_dict(tangents)
