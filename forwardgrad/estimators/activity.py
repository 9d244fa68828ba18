"""Activity-perturbed forward gradients (FG-A): Ren, Kornblith, Liao & Hinton, *Scaling Forward
Gradient with Local Losses* (ICLR 2023).

Instead of the weights, perturb each chosen layer's output z (per example) with a tangent u and
take, in one forward-mode evaluation, each example's directional derivative

    d_{k,n} = ∇_{z_n} ℓ_n · u_{k,n}        (ℓ_n the loss of example n),

estimate the gradient at the output by ĝ_n = (1/B)(1/K) Σ_k d_{k,n} u_{k,n} (the objective is
the batch mean, hence 1/B) and form the layer's weight and bias gradients from ĝ and the layer's
input with the layer's own rule (``local_rules``: Σ_n ĝ_n x_nᵀ for a linear layer). A weight
tangent has as many components as the layer has weights; u has as many as one example's output,
so the variance scales with the activations of one example, not the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
from torch import nn

from forwardgrad import tangents as tg
from forwardgrad.errors import ConfigurationError
from forwardgrad.estimators.base import (
    WIRE_BYTES,
    Seeded,
    check_finite,
    trainable,
    write_grads,
)
from forwardgrad.estimators.local_rules import has_local_rule, parameter_gradients
from forwardgrad.estimators.tables import LossTable, group_of_parameters, objective
from forwardgrad.jvp import add_tangent, directional_derivatives
from forwardgrad.seeds import derive_seed, draw_seed
from forwardgrad.tangents.sources import TangentSource


class NoParameterTangents(TangentSource):
    """K tangents for no parameter: the weights stay put and tangents enter at activations."""

    def __init__(self, count: int) -> None:
        super().__init__([], count)


@dataclass
class _Layer:
    name: str
    module: nn.Module
    group: int | None = None  # the loss group it serves, for a model with local losses
    slot: int = 0  # layerwise: which K of the K·S stacked tangents are its own


@dataclass
class PerturbedCall:
    """One run of a perturbed layer in one step.

    Attributes:
        layer: the layer (``name``, ``module``, ``group``: the loss group it serves or None).
        u: its tangents, ``(K, *z.shape)`` (filled by ``output_gradients``; ``estimate`` draws
            them again from the step's seed when it needs them instead of keeping them).
        x: its input (detached).
        output_gradient: ĝ, the estimate of ∂L/∂z, shaped like z (filled by
            ``output_gradients``).
    """

    layer: _Layer
    u: torch.Tensor | None = None
    x: torch.Tensor | None = None
    output_gradient: torch.Tensor | None = None
    position: int = 0  # of the run in the step: its tangents' stream
    like: torch.Tensor | None = None  # an empty tensor of z's shape, dtype and device
    coefficients: torch.Tensor | None = None  # (K, B): ĝ_n = Σ_k c_kn u_kn


class _Perturbation:
    """One step's perturbations: forward hooks that add u to each chosen layer's output and
    keep its input. The engine may run the closure more than once (a first-use check, K
    evaluations on the general path): call ``rewind`` before each run, and every run sees
    the same tangents, in the order the layers run. Tangents are not kept: every run draws
    them again from the stream (seed, position), so a step holds one layer's at a time beside
    the layers' inputs, not every layer's."""

    def __init__(self, layers: list[_Layer], count: int, distribution: str, seed: int):
        self.layers, self.count, self.distribution, self.seed = layers, count, distribution, seed
        self.slots = 1 + max(layer.slot for layer in layers)
        self.calls: list[PerturbedCall] = []
        self.position = 0

    def rewind(self) -> None:
        self.position = 0

    def tangents(self, call: PerturbedCall) -> torch.Tensor:
        """The call's tangents u ``(K, *z.shape)``: all K at once from the stream (seed,
        position), i.i.d. over k, n and units."""
        like = call.like
        u = torch.empty((self.count, *like.shape), dtype=like.dtype, device=like.device)
        tg.fill_tangent(u, self.distribution, self.seed, call.position, 0)
        return u

    def output_gradient(self, call: PerturbedCall) -> torch.Tensor:
        """ĝ = Σ_k c_k u_k for one call, its tangents drawn again."""
        return torch.einsum("kn,kn...->n...", call.coefficients, self.tangents(call))

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        handles = [layer.module.register_forward_hook(self._hook(layer)) for layer in self.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, layer: _Layer) -> Callable:
        def hook(module, args, output):
            position, self.position = self.position, self.position + 1
            if position == len(self.calls):
                like = torch.empty((), dtype=output.dtype, device=output.device)
                like = like.expand(output.shape)  # shape, dtype and device: one element
                self.calls.append(PerturbedCall(layer, position=position, like=like))
            call = self.calls[position]
            call.x = fwAD.unpack_dual(args[0]).primal.detach()
            u = self.tangents(call)
            if self.slots == 1:
                return add_tangent(output, u)
            stacked = u.new_zeros((self.count * self.slots, *output.shape))
            stacked[layer.slot * self.count : (layer.slot + 1) * self.count] = u
            return add_tangent(output, stacked)

        return hook


class ActivityPerturbation(Seeded):
    """Activity-perturbed forward gradients (see the module docstring), one protocol with the
    other estimators: ``loss = est.estimate(model, closure)`` fills ``.grad``.

    **The closure returns per-example losses**: ``(B,)`` (``reduction="none"``), or with local
    losses the ``(G, B)`` table of ``LocalLosses.losses``; the estimate is of the gradient of
    L = Σ_g (1/B) Σ_n ℓ_{g,n} (``estimators.tables``), and the returned loss is L. A scalar
    closure is refused with a ``ConfigurationError``: its derivative along a batch-wide u is a
    single number for all examples, which would leave an estimator as noisy as perturbing the
    whole batch's activations at once, the opposite of what this estimator is for.

    **Several layers at once.** Every chosen layer j gets its own independent u^j in the same
    evaluation, so d_n = Σ_j ∇_{z^j_n} ℓ_n · u^j_n and ĝ^l_n = d_n u^l_n. Since E[u^l u^jᵀ] = 0
    for j ≠ l and = I for j = l, E[ĝ^l_n] = ∇_{z^l_n} ℓ_n: unbiased. The price is variance:
    for Gaussian u (K = 1) E‖ĝ^l_n‖² = (D_l + 2)‖∇_{z^l_n} ℓ_n‖² + D_l Σ_{j≠l} ‖∇_{z^j_n} ℓ_n‖²
    (D_l the size of z^l_n); the second term, the other layers' noise, is what one evaluation
    per layer would avoid at L times the cost. With local losses (a model with ``loss_groups``,
    e.g. ``LocalLosses``) layer l uses only its own group's derivative d_{g(l),n}, so the other
    blocks' layers add no noise. ``layerwise=True`` removes the second term altogether: each
    layer serving a loss gets K tangent slots of its own, zero at the other layers, in the same
    evaluation (K·S stacked tangents, S the most layers serving one loss), so that d for layer
    l is ∇_{z^l_n} ℓ_n · u^l_n alone and E‖ĝ^l_n‖² = (D_l + 2)‖∇_{z^l_n} ℓ_n‖², at S times the
    tangent arithmetic. Models that mix examples (BatchNorm in training mode) break
    the per-example assumption ∂ℓ_n/∂z_m = 0 for m ≠ n, and the estimate is then biased.

    Every trainable parameter must belong to a perturbed layer (else ``ConfigurationError``:
    freeze the others); a perturbed layer that never runs gets a zero gradient, as does a
    parameter used outside its module's forward. Tangents are drawn per step from this
    estimator's generator (in a data-parallel job, from a stream of each rank's own); the
    estimate goes through the derivative engine (``last_path``, ``last_fallback``), and a
    ``DataParallel`` job sums the loss and every gradient over the ranks.

    Args:
        tangents: K >= 1 tangents per layer; their estimates are averaged.
        distribution: ``"normal"`` or ``"rademacher"``.
        seed: seeds the tangents (``None``: drawn from torch's global generator).
        modules: names of (or references to) the layers to perturb: Linear, Conv1d/2d/3d;
            ``None`` chooses every such layer with trainable parameters.
        layerwise: give each layer of a loss its own tangents (see above).
        fast: try the engine's fast path first.
    """

    name = "activity"
    options = ("tangents", "distribution", "seed", "modules", "layerwise", "fast")

    def __init__(
        self,
        tangents: int = 1,
        distribution: str = "normal",
        seed: int | None = None,
        modules: Sequence[str | nn.Module] | None = None,
        layerwise: bool = False,
        fast: bool = True,
    ):
        self.tangents = tg.check_count(tangents)
        self.distribution = tg.check_distribution(distribution, tg.STREAMABLE)
        self.modules = _check_modules(modules)
        self.layerwise, self.fast = bool(layerwise), bool(fast)
        super().__init__(seed)

    def describe(self) -> str:
        layerwise = ", layerwise" if self.layerwise else ""
        return f"activity (K={self.tangents}, {self.distribution}{layerwise})"

    def bytes_per_step(self, model: nn.Module) -> int:
        params = _estimated(self.layers(model))
        return WIRE_BYTES * (1 + sum(p.numel() for p in params))  # the loss, every gradient

    def layers(self, model: nn.Module) -> list[_Layer]:
        """The layers this estimator perturbs in ``model``, checked (see ``modules``)."""
        layers = _resolve(model, self.modules)
        grouped = group_of_parameters(model, _estimated(layers))
        if grouped is not None:
            index = dict(zip(map(id, _estimated(layers)), grouped[0]))
            for layer in layers:
                own = _estimated([layer])
                layer.group = index[id(own[0])] if own else None
        if self.layerwise:  # slots counted within each loss group
            seen: dict[int | None, int] = {}
            for layer in layers:
                layer.slot = seen[layer.group] = seen.get(layer.group, -1) + 1
        return layers

    def estimate(self, model: nn.Module, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        params = trainable(model)
        layers = self.layers(model)
        _check_covered(model, params, layers)
        loss, perturbation = self._evaluate(model, closure, layers)
        estimated = _estimated(layers)
        wanted, grads = {id(p) for p in estimated}, {}
        for call in perturbation.calls:  # each layer's own rule, summed over its calls
            g = perturbation.output_gradient(call)
            x, call.x = call.x, None  # the inputs go as the rules use them
            for p, grad in parameter_gradients(call.layer.module, x, g):
                if id(p) in grads:
                    grads[id(p)].add_(grad.to(p.dtype))
                elif id(p) in wanted:
                    grads[id(p)] = grad.to(p.dtype)
        found = [grads.get(id(p), torch.zeros_like(p)) for p in estimated]  # a layer not run: 0
        loss, found = self._reduced(loss, found)
        write_grads(estimated, found)
        return loss

    def output_gradients(
        self, model: nn.Module, closure: Callable[[], torch.Tensor]
    ) -> tuple[torch.Tensor, list[PerturbedCall]]:
        """One evaluation without the local rules: the loss L and, for every run of a perturbed
        layer, its tangents u and the estimate ĝ of ∂L/∂z (on this process's examples: not
        summed over the ranks of a data-parallel job). ``.grad`` is not touched."""
        trainable(model)
        loss, perturbation = self._evaluate(model, closure, self.layers(model))
        for call in perturbation.calls:
            call.u = perturbation.tangents(call)
            call.output_gradient = perturbation.output_gradient(call)
        return loss, perturbation.calls

    def _evaluate(self, model, closure, layers) -> tuple[torch.Tensor, _Perturbation]:
        """One evaluation by the engine with every layer's output perturbed; each call's
        coefficients of ĝ from the per-example derivatives d ``(K, rows, B)``."""
        grouped = group_of_parameters(model, trainable(model))
        groups = None if grouped is None else grouped[1]
        perturbation = _Perturbation(layers, self.tangents, self.distribution, self._step_seed())
        table = LossTable(closure, groups, True, perturbation.rewind)
        count = self.tangents * perturbation.slots
        with perturbation.installed():
            result = directional_derivatives(
                model, table, NoParameterTangents(count), vector=True, fast=self.fast
            )
        self.last_path, self.last_fallback = result.path, result.fallback
        derivatives = result.derivatives.reshape(count, table.rows, -1)
        _check_batch(perturbation.calls, derivatives.shape[2])
        loss = objective(result.value, table.rows).sum()
        check_finite(loss, derivatives)
        count, batch = self.tangents, derivatives.shape[2]
        for call in perturbation.calls:
            own = derivatives[call.layer.slot * count : (call.layer.slot + 1) * count]
            group = call.layer.group  # with local losses, only its own group's derivatives
            d = own[:, group] if group is not None else own.sum(1)
            call.coefficients = (d / (count * batch)).to(call.like.dtype)
        return loss, perturbation

    def _step_seed(self) -> int:
        seed = draw_seed(self.generator("cpu"))
        if self.reducer is not None and dist.is_available() and dist.is_initialized():
            seed = derive_seed(seed, "rank", dist.get_rank())  # independent u on every rank
        return seed

    def _reduced(self, loss, grads):
        """The loss and gradients summed over the ranks of a data-parallel job."""
        if self.reducer is None:
            return loss, grads
        flat = torch.cat([loss.reshape(1).to(grads[0].dtype), *[g.reshape(-1) for g in grads]])
        total = self.reduced(flat, f"the all-reduce of the step's {flat.numel()} numbers")
        check_finite(total[:1])
        pieces = total[1:].split([g.numel() for g in grads])
        return total[0], [piece.view_as(g) for piece, g in zip(pieces, grads)]


def _check_modules(modules) -> tuple | None:
    if modules is None:
        return None
    if isinstance(modules, (str, nn.Module)) or not isinstance(modules, Sequence):
        raise ConfigurationError(
            f"modules must be a list of submodule names (or modules), got {modules!r}."
        )
    if not modules or not all(isinstance(m, (str, nn.Module)) for m in modules):
        raise ConfigurationError(
            f"modules must be a non-empty list of submodule names (or modules), got {modules!r}."
        )
    return tuple(modules)


def _resolve(model: nn.Module, modules) -> list[_Layer]:
    """The chosen layers by name, checked to be submodules with a local rule."""
    named = dict(model.named_modules())
    if modules is None:
        chosen = [
            name
            for name, m in named.items()
            if has_local_rule(m) and any(p.requires_grad for p in m.parameters(recurse=False))
        ]
        if not chosen:
            raise ConfigurationError(
                f"{type(model).__name__} has no Linear or Conv layer with trainable parameters "
                "to perturb; activity perturbation forms gradients with those layers' own rules."
            )
    else:
        names = {id(m): name for name, m in named.items()}
        chosen = [m if isinstance(m, str) else names.get(id(m), m) for m in modules]
    layers = []
    for name in chosen:
        module = named.get(name) if isinstance(name, str) else None
        if module is None:
            label = name if isinstance(name, str) else type(name).__name__
            raise ConfigurationError(
                f"modules names {label!r}, which is not a submodule of {type(model).__name__}; "
                f"use names from model.named_modules(), e.g. {_examples(named)}."
            )
        if not has_local_rule(module):
            raise ConfigurationError(
                f"module {name!r} is a {type(module).__name__}; activity perturbation has a "
                "local gradient rule only for Linear and Conv1d/2d/3d layers."
            )
        layers.append(_Layer(name, module))
    return layers


def _examples(named: dict) -> str:
    found = [repr(n) for n, m in named.items() if has_local_rule(m)][:3]
    return ", ".join(found) or "none has a local rule"


def _estimated(layers: list[_Layer]) -> list[nn.Parameter]:
    """The trainable parameters of the layers, once each."""
    seen, params = set(), []
    for layer in layers:
        for p in layer.module.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _check_covered(model: nn.Module, params, layers) -> None:
    covered = {id(p) for p in _estimated(layers)}
    names = {id(p): name for name, p in model.named_parameters()}
    missing = [names.get(id(p), "?") for p in params if id(p) not in covered]
    if missing:
        shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        raise ConfigurationError(
            f"activity perturbation estimates only the parameters of the layers it perturbs, "
            f"and {shown} belong to none; perturb their layers too, or freeze them "
            "(requires_grad_(False))."
        )


def _check_batch(calls: list[PerturbedCall], batch: int) -> None:
    for call in calls:
        rows = call.like.shape[0] if call.like.dim() > 0 else None
        if rows != batch:
            raise ConfigurationError(
                f"module {call.layer.name!r} output has {rows} examples along its first "
                f"dimension, but the closure returned {batch} losses per row; the batch must "
                "come first and the closure must return one loss per example."
            )


__all__ = ["ActivityPerturbation", "NoParameterTangents", "PerturbedCall"]
