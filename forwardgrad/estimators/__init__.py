"""Gradient estimators: forward gradient, zeroth-order (SPSA) and exact backprop, one protocol.

Two layers:

- Functional: ``forward_grad(fn, params, ...)``, ``zeroth_order_grad``, ``backprop_grad`` take a
  function of a dict of tensors and return ``(value, grads)``, like ``torch.func``.
- Module: ``ForwardGradient``, ``ZerothOrder``, ``Backprop`` share ``loss = est.estimate(model,
  closure)``; it overwrites ``.grad`` of every trainable parameter with the estimate, so any
  ``torch.optim`` optimizer applies the step.

The forward gradient's directional derivatives come from forward-mode AD (dual tensors,
``torch.autograd.forward_ad``) evaluated under ``torch.no_grad()``: no graph is recorded and no
backward pass runs.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from forwardgrad import tangents as tg
from forwardgrad.errors import EstimatorError, NonFiniteLoss
from forwardgrad.jvp import stacked as fp

try:  # The math kernel is the one attention kernel with forward-mode formulas on every device.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def _attention_with_forward_ad() -> contextlib.AbstractContextManager:
        return sdpa_kernel([SDPBackend.MATH])

except ImportError:  # pragma: no cover - older torch

    def _attention_with_forward_ad() -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


try:  # Legacy vmap is the one that batches dual tensors (torch.func.vmap cannot batch make_dual).
    from torch._vmap_internals import _vmap as _batch_over_tangents
except ImportError:  # pragma: no cover
    _batch_over_tangents = None

_NO_FORWARD_AD = re.compile(r"forward AD with (?:aten::)?([\w.]+)")
_CUSTOM_FUNCTION_WITHOUT_JVP = "implement the jvp function for custom autograd.Function"
_BACKWARD_CALLED = ("does not require grad", "backward through the graph a second time")


# ---------------------------------------------------------------------------------------------
# Checks shared by every estimator


def _check_loss(loss: object) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"the closure returned {type(loss).__name__}, not a tensor; return the scalar loss "
            "tensor computed with the model."
        )
    if loss.numel() != 1:
        raise ValueError(
            f"the loss must be a scalar, got shape {tuple(loss.shape)}; reduce it first, e.g. "
            "loss.mean() or loss.sum()."
        )
    if not (loss.is_floating_point() or loss.is_complex()):
        raise TypeError(f"the loss has dtype {loss.dtype}; it must be a floating-point tensor.")
    return loss.reshape(())


def _check_finite(loss: torch.Tensor, derivatives: torch.Tensor | None = None) -> None:
    if not bool(torch.isfinite(loss)):
        raise NonFiniteLoss(loss.item(), "the loss")
    if derivatives is not None and not bool(torch.isfinite(derivatives).all()):
        bad = derivatives[~torch.isfinite(derivatives)].flatten()[0].item()
        raise NonFiniteLoss(
            bad,
            "a directional derivative",
            "the model was left unchanged; lower the learning rate or check the model for "
            "operations that overflow.",
        )


def _trainable(model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    """Trainable parameters once each (tied weights appear once) with one of their names."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}.")
    names, params = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            names.append(name)
            params.append(p)
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no parameter with requires_grad=True; there is nothing "
            "to estimate a gradient for."
        )
    return names, params


def _write_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """Overwrite ``.grad`` (not accumulate): an estimate replaces whatever was there."""
    for p, g in zip(params, grads):
        g = g.detach().to(dtype=p.dtype)
        if p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype:
            p.grad.copy_(g)
        else:
            p.grad = g.clone() if g.data_ptr() == p.data_ptr() else g


def _as_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _fresh_seed() -> int:
    # Drawn from torch's global generator, so torch.manual_seed makes an unseeded estimator
    # reproducible too.
    return int(torch.randint(0, 2**62, (1,)))


# ---------------------------------------------------------------------------------------------
# Running a closure with dual parameters


class _Replay:
    """Buffers and RNG states at one moment, to re-run a forward as if it were the first.

    Several evaluations that must count as one ordinary forward (K tangents evaluated one by
    one, the two points of a central difference) rewind to this snapshot before each, so that
    BatchNorm's running statistics are updated once and Dropout draws the same mask each time.
    """

    def __init__(self, model: nn.Module):
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        # A forward may rebind a buffer (self.ema = 0.9 * self.ema + ...) rather than update it
        # in place: rewinding puts the original tensor back in its slot too.
        self.slots = [
            (module, name, b)
            for module in model.modules()
            for name, b in module._buffers.items()
            if b is not None
        ]
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = (
            torch.cuda.get_rng_state_all()
            if torch.cuda.is_available() and torch.cuda.is_initialized()
            else None
        )

    def rewind(self) -> None:
        for module, name, b in self.slots:
            module._buffers[name] = b
        with torch.no_grad():
            for buffer, saved in self.buffers:
                buffer.copy_(saved)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


@contextlib.contextmanager
def _without_mha_fastpath() -> Iterator[None]:
    # nn.MultiheadAttention's inference fast path is a fused kernel with no forward-mode formula.
    backend = getattr(torch.backends, "mha", None)
    if backend is None:
        yield
        return
    enabled = backend.get_fastpath_enabled()
    backend.set_fastpath_enabled(False)
    try:
        yield
    finally:
        backend.set_fastpath_enabled(enabled)


@contextlib.contextmanager
def _forward_mode_context() -> Iterator[None]:
    with torch.no_grad(), _attention_with_forward_ad(), _without_mha_fastpath():
        yield


@contextlib.contextmanager
def _parameters_replaced(model: nn.Module, values: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Put ``values[id(p)]`` in place of every parameter p of ``model`` for the duration.

    Replacement is by identity, so tied weights get the same tensor; nothing is left behind,
    also when the body raises.
    """
    swapped = []
    try:
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None and id(p) in values:
                    swapped.append((module, name, p))
        for module, name, _ in swapped:
            module._parameters[name] = values[id(module._parameters[name])]
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


class _CapturedParameters(TorchFunctionMode):
    """Hands every operation the dual tensor in place of the parameter it stands for.

    ``_parameters_replaced`` covers what the closure reaches through the model; this covers
    references captured before the call (``params = list(model.parameters())`` used for an L2
    penalty inside the closure), which would otherwise be constants with no tangent.
    """

    def __init__(self, values: Mapping[int, torch.Tensor]):
        super().__init__()
        self.values = values

    def __torch_function__(self, func, types, args=(), kwargs=None):
        def swap(value):
            if isinstance(value, torch.Tensor):
                return self.values.get(id(value), value)
            return value

        args, kwargs = tree_map(swap, (args, kwargs or {}))
        return func(*args, **kwargs)


def _call_closure(closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    try:
        loss = closure()
    except RuntimeError as error:
        if any(s in str(error) for s in _BACKWARD_CALLED):
            raise ValueError(
                "the closure called backward(); estimators compute the gradient themselves, so "
                "return the loss without calling backward."
            ) from None
        raise
    return _check_loss(loss)


def _locate_failure(model: nn.Module, run: Callable[[], object]) -> str | None:
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


def _unsupported_op_error(error: RuntimeError, where: str | None) -> EstimatorError | None:
    place = f" in module {where}" if where else ""
    if _CUSTOM_FUNCTION_WITHOUT_JVP in str(error):
        return EstimatorError(
            f"a custom torch.autograd.Function{place} has no jvp (forward-mode derivative); "
            "give it a jvp staticmethod, or use the Backprop or ZerothOrder estimator."
        )
    match = _NO_FORWARD_AD.search(str(error))
    if match is None:
        return None
    return EstimatorError(
        f"PyTorch has no forward-mode derivative for the operation '{match.group(1)}'{place}; "
        "replace it with an equivalent built from supported operations (or a custom "
        "torch.autograd.Function with a jvp), or use the Backprop or ZerothOrder estimator."
    )


def _dual_evaluation(
    evaluate: Callable[[list[torch.Tensor]], torch.Tensor],
    params: Sequence[torch.Tensor],
    directions: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """f(θ) and ∇f(θ)·v from one forward pass on dual tensors (θ + ε v, ε² = 0)."""
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p.detach(), v) for p, v in zip(params, directions)]
        value = evaluate(duals)
        primal, tangent = fwAD.unpack_dual(value)
        if tangent is None:  # the loss does not depend on the parameters
            tangent = torch.zeros_like(primal)
        return primal.detach(), tangent.detach()


def directional_derivatives_of(
    evaluate: Callable[[list[torch.Tensor]], torch.Tensor],
    params: Sequence[torch.Tensor],
    tangents: Sequence[torch.Tensor],
    replay: _Replay | None = None,
    batched: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The value f(θ) and the K directional derivatives d_k = ∇f(θ)·v_k by forward-mode AD.

    With K > 1 the K tangents are first pushed through one vectorised forward pass; when the
    closure cannot be vectorised (random ops such as Dropout, ops without a batching rule) it
    falls back to K passes, each rewound by ``replay`` so together they count as one forward.

    Returns:
      ``(value, derivatives, batched_ok)`` where ``batched_ok`` tells whether the vectorised
      pass worked (callers cache it to skip the attempt next time).
    """
    count = tangents[0].shape[0]
    if count > 1 and batched and _batch_over_tangents is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                values, derivatives = _batch_over_tangents(
                    lambda *vs: _dual_evaluation(evaluate, params, vs)
                )(*tangents)
            return values[0], derivatives, True
        except (RuntimeError, NotImplementedError):
            if replay is not None:
                replay.rewind()
    derivatives = torch.empty(count, dtype=params[0].dtype, device=params[0].device)
    value = None
    for k in range(count):
        if k > 0 and replay is not None:
            replay.rewind()
        value, derivatives[k] = _dual_evaluation(evaluate, params, [v[k] for v in tangents])
    return value, derivatives, False


# ---------------------------------------------------------------------------------------------
# Functional forms


def _check_params(params: Mapping[str, torch.Tensor]) -> tuple[list[str], list[torch.Tensor]]:
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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The forward gradient of ``fn`` at ``params`` (Baydin et al. 2022, Algorithm 1).

    g = Σ_k c_k v_k with d_k = ∇f·v_k from forward-mode AD; ``combine="mean"`` gives
    c = d / K, ``"projection"`` the unbiased scaled projection of ``tangents.combine``.

    Args:
      fn: maps a dict of tensors to a scalar tensor; it must be built from operations with
        forward-mode derivatives.
      params: the point θ, a dict of name -> tensor.
      tangents: K, the number of random directions.
      distribution: ``"normal"``, ``"rademacher"`` or ``"orthogonal"``.
      combine: ``"mean"`` or ``"projection"``.
      generator: source of the tangents; ``None`` uses torch's global generator.

    Returns:
      ``(value, grads)``: f(θ) detached and a dict of gradient estimates shaped like ``params``.
    """
    tg.check_count(tangents)
    tg.check_distribution(distribution)
    tg.check_combine(combine)
    names, values = _check_params(params)
    directions = tg.sample_tangents(values, tangents, distribution, generator)

    def evaluate(duals: list[torch.Tensor]) -> torch.Tensor:
        return _check_loss(fn(dict(zip(names, duals))))

    with _forward_mode_context():
        value, derivatives, _ = directional_derivatives_of(evaluate, values, directions)
    _check_finite(value, derivatives)
    grads = tg.combine(derivatives, directions, combine)
    return value, dict(zip(names, grads))


def zeroth_order_grad(
    fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    tangents: int = 1,
    eps: float = 1e-3,
    distribution: str = "normal",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Two-point SPSA estimate from values of ``fn`` only (Spall 1992; Malladi et al. 2023).

    g = (1/K) Σ_k [f(θ + ε z_k) − f(θ − ε z_k)] / (2ε) · z_k. Its bias is O(ε²) on smooth f.
    This functional form evaluates out of place and returns the mean of f(θ ± ε z_k) as value.

    Returns:
      ``(value, grads)`` as ``forward_grad``.
    """
    _check_zeroth_order_args(tangents, eps, distribution)
    names, values = _check_params(params)
    directions = tg.sample_tangents(values, tangents, distribution, generator)
    differences, total = [], 0.0
    with torch.no_grad():
        for k in range(tangents):
            plus = _check_loss(
                fn({n: p + eps * v[k] for n, p, v in zip(names, values, directions)})
            )
            minus = _check_loss(
                fn({n: p - eps * v[k] for n, p, v in zip(names, values, directions)})
            )
            differences.append((plus - minus) / (2 * eps))
            total = total + (plus + minus) / 2
    value = (total / tangents).detach()
    derivatives = torch.stack(differences)
    _check_finite(value, derivatives)
    grads = tg.combine(derivatives, directions, "mean")
    return value, dict(zip(names, grads))


def backprop_grad(
    fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], params: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The exact gradient by reverse-mode autograd: the reference for every other estimator."""
    names, values = _check_params(params)
    leaves = [p.clone().requires_grad_(True) for p in values]
    with torch.enable_grad():
        value = _check_loss(fn(dict(zip(names, leaves))))
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
    _check_finite(value.detach())
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(values, grads)]
    return value.detach(), dict(zip(names, grads))


def _check_zeroth_order_args(tangents: int, eps: float, distribution: str) -> None:
    tg.check_count(tangents)
    tg.check_distribution(distribution, ("normal", "rademacher"))
    if (
        isinstance(eps, bool)
        or not isinstance(eps, (int, float))
        or not math.isfinite(eps)
        or eps <= 0
    ):
        raise ValueError(f"eps must be a positive finite number (e.g. 1e-3), got {eps!r}.")


# ---------------------------------------------------------------------------------------------
# Module estimators


class Estimator:
    """Protocol: ``loss = est.estimate(model, closure)`` overwrites ``.grad`` of the trainable
    parameters with a gradient estimate and returns the loss, detached.

    ``closure()`` takes no arguments and returns the scalar loss computed with ``model``; it
    must not call ``backward()``. Afterwards the model holds its own parameters again, with no
    dual tensors, hooks or perturbations left behind, also when the closure raises.
    """

    name = "estimator"

    def estimate(self, model: nn.Module, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def describe(self) -> str:
        return self.name


class _Seeded(Estimator):
    """An estimator whose randomness comes from its own generator, never the global one."""

    def __init__(self, seed: int | None):
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an integer or None, got {seed!r}.")
        self.seed = _fresh_seed() if seed is None else int(seed)
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device | str) -> torch.Generator:
        """This estimator's generator on ``device``, seeded by the seed alone.

        The stream must not depend on the device index: data-parallel ranks on cuda:0 and
        cuda:1 have to draw the same tangents.
        """
        device = torch.device(device)
        key = str(device)
        if key not in self._generators:
            self._generators[key] = _as_generator(self.seed, device)
        return self._generators[key]

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "generators": {k: g.get_state() for k, g in self._generators.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self._generators = {}
        for key, rng_state in state.get("generators", {}).items():
            self.generator(key).set_state(rng_state)


# Per model, the fast-path variants already checked against forward-mode AD (shared by every
# estimator, so that a new estimator on the same model does not pay the check again).
_FAST_PATH_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ForwardGradient(_Seeded):
    """The forward gradient g = Σ_k c_k v_k from K directional derivatives by forward-mode AD.

    Each ``estimate`` draws K fresh tangents from this estimator's generator, evaluates the
    closure on dual parameters θ + ε v (under ``torch.no_grad()``, so no graph is built and no
    backward pass runs), and combines the K derivatives d_k = ∇f·v_k:

    - ``combine="mean"``: g = (1/K) Σ d_k v_k. Unbiased; for K = 1 and Gaussian tangents
      E‖g‖² = (n + 2)‖∇f‖², for Rademacher n‖∇f‖² (n parameters); K tangents divide the
      covariance by K.
    - ``combine="projection"``: g = (n / rank B) · B (BᵀB)⁺ d, the orthogonal projection of
      ∇f onto the span of the tangents scaled to be unbiased; with K >= n it is ∇f exactly.

    ``.grad`` is overwritten, not accumulated. BatchNorm running statistics are updated once per
    estimate and Dropout draws one mask shared by the value and every tangent.

    With normal or Rademacher tangents, a closure built from the operations that
    ``forwardgrad.jvp.stacked`` covers runs once with the K tangents stacked as a batch
    dimension, each parameter's tangent drawn as its layer runs (K = 1: into ``.grad``); any
    other closure takes the general dual-tensor path, from then on for that model. Both give
    the same estimate for the same seed, to float rounding.

    Args:
      tangents: K >= 1.
      distribution: ``"normal"``, ``"rademacher"`` or ``"orthogonal"`` (K <= n).
      combine: ``"mean"`` or ``"projection"``.
      seed: seeds the tangents; the same seed reproduces the same estimates bit for bit.
        ``None`` draws a seed from torch's global generator.
    """

    name = "forward"

    def __init__(
        self,
        tangents: int = 1,
        distribution: str = "normal",
        combine: str = "mean",
        seed: int | None = None,
    ):
        self.tangents = tg.check_count(tangents)
        self.distribution = tg.check_distribution(distribution)
        self.combine = tg.check_combine(combine)
        super().__init__(seed)
        # Per model: whether the vectorised K-tangent pass works and agrees with K plain passes.
        # Legacy vmap's batching rules are checked once against the loop, never trusted blindly.
        self._batching: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # Models whose closure used an operation that fast_paths has no rule for, or whose
        # fast-path derivatives disagreed with the general path's on first use.
        self._general: weakref.WeakSet = weakref.WeakSet()
        # K > 1: the tangent tensors of the last step, reused so that each step does not pay
        # the page faults of fresh multi-megabyte allocations.
        self._buffers: dict[int, torch.Tensor] = {}

    def describe(self) -> str:
        return f"forward (K={self.tangents}, {self.distribution}, {self.combine})"

    def sample(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Draw this step's K tangents for ``params``."""
        return tg.sample_tangents(
            params, self.tangents, self.distribution, self.generator(params[0].device)
        )

    def directional_derivatives(
        self,
        model: nn.Module,
        closure: Callable[[], torch.Tensor],
        params: Sequence[nn.Parameter],
        directions: Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss and d_k = ∇L·v_k for given tangents, by forward-mode AD on ``model``."""
        replay = _Replay(model)

        def evaluate(duals: list[torch.Tensor]) -> torch.Tensor:
            values = {id(p): d for p, d in zip(params, duals)}
            with _parameters_replaced(model, values), _CapturedParameters(values):
                return _call_closure(closure)

        try:
            with _forward_mode_context():
                batched = self._batching.get(model, True)
                loss, derivatives, batched_ok = directional_derivatives_of(
                    evaluate, params, directions, replay, batched
                )
                if batched_ok and model not in self._batching:
                    replay.rewind()
                    loss, reference, _ = directional_derivatives_of(
                        evaluate, params, directions, replay, batched=False
                    )
                    scale = reference.abs().max().clamp_min(1.0)
                    batched_ok = bool((derivatives - reference).abs().max() <= 1e-4 * scale)
                    derivatives = reference
        except RuntimeError as error:
            replay.rewind()
            located = _locate_failure(
                model,
                lambda: _dual_evaluation(evaluate, params, [v[0] for v in directions]),
            )
            replay.rewind()
            friendly = _unsupported_op_error(error, located)
            if friendly is None:
                raise
            raise friendly from None
        if self.tangents > 1 and model not in self._batching:
            self._batching[model] = batched_ok
        return loss, derivatives

    def combine_estimate(
        self, derivatives: torch.Tensor, directions: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The estimate Σ_k c_k v_k for the derivatives and tangents of one step."""
        return tg.combine(derivatives, directions, self.combine)

    def estimate(self, model: nn.Module, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        _, params = _trainable(model)
        loss = self._fast_estimate(model, closure, params)
        if loss is not None:
            return loss
        directions = self.sample(params)
        loss, derivatives = self.directional_derivatives(model, closure, params, directions)
        _check_finite(loss, derivatives)
        _write_grads(params, self.combine_estimate(derivatives, directions))
        return loss

    def _fast_estimate(
        self, model: nn.Module, closure: Callable[[], torch.Tensor], params: list[nn.Parameter]
    ) -> torch.Tensor | None:
        """The estimate by ``fast_paths``: the closure runs once with the K tangents stacked.

        The same tangents as ``sample`` (same seed, same numbers), so the same estimate as the
        general path to rounding. K = 1 draws each tangent into ``.grad`` just before its layer
        runs and scales it there. Returns ``None``, with the model, buffers, RNG states and
        generator as they were, when the closure uses an operation without a rule there (the
        model then stays on the general path) or fails in any other way (the general path
        then runs it again and reports the error).
        """
        if self.distribution not in fp.DISTRIBUTIONS or model in self._general:
            return None
        generator = self.generator(params[0].device)
        generator_state = generator.get_state()
        seed = tg.draw_seed(generator)
        if self.tangents == 1:
            source = fp.GradTangents(params, self.distribution, seed)
        else:
            source = fp.HeldTangents(params, self.tangents, self.distribution, seed, self._buffers)
        had_grad = [p.grad is not None for p in params]
        result = None
        try:
            result = self.fast_derivatives(
                model, closure, source, self._verification_key(), self._general
            )
        finally:
            if result is None:  # K = 1 drew tangents into .grad
                for p, had in zip(params, had_grad):
                    if not had:
                        p.grad = None
                    elif self.tangents == 1:
                        p.grad.zero_()
        if result is None:
            generator.set_state(generator_state)
            return None
        return self._write_fast_estimate(params, source, *result)

    def fast_derivatives(
        self,
        model: nn.Module,
        closure: Callable[[], torch.Tensor],
        source: fp.TangentSource,
        key: tuple,
        general: weakref.WeakSet,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The loss and the K derivatives by ``fast_paths``, for ``source``'s tangents.

        On a model's first use for ``key`` they are checked against the general path
        (``verify_fast_derivatives``). Returns ``None``, with buffers and RNG states as they
        were, when the fast path cannot run the closure: on ``fp.Unsupported`` the model joins
        ``general`` for good; any other failure the general path runs again and reports. A
        non-finite loss or derivative raises ``EstimatorError``.
        """
        params = source.params
        replay = _Replay(model)
        try:
            with torch.no_grad():  # no graph; the dual-tensor settings are not needed here
                loss, derivatives = fp.stacked_derivatives(
                    lambda: _call_closure(closure), params, source, source.count, replay.rewind
                )
            _check_finite(loss, derivatives)
            if key not in _FAST_PATH_VERIFIED.get(model, ()):
                directions = [source.draw(i) for i in range(len(params))]  # whole, this once
                self.verify_fast_derivatives(
                    model, closure, params, directions, derivatives, replay, key
                )
        except EstimatorError:
            raise
        except Exception as error:
            if isinstance(error, fp.Unsupported):
                general.add(model)
            replay.rewind()
            return None
        return loss, derivatives

    def verify_fast_derivatives(
        self,
        model: nn.Module,
        closure: Callable[[], torch.Tensor],
        params: list[nn.Parameter],
        directions: Sequence[torch.Tensor],
        derivatives: torch.Tensor,
        before_forward: _Replay,
        key: tuple,
    ) -> None:
        """Recompute fast-path derivatives by dual tensors, once per model and ``key``.

        The stacked-tangent rules cannot see every way a closure may compute (TorchScript
        runs below them, for one), so their result is trusted only once it has matched
        PyTorch's own forward-mode AD for the same tangents. On a mismatch the model moves
        to the general path for good (``fp.Unsupported``). The general path starts from the
        buffers and RNG states the fast one started from (``before_forward``: the same Dropout
        masks, the same BatchNorm statistics); state is left as after one forward.
        """
        after_forward = _Replay(model)
        before_forward.rewind()
        try:
            _, reference = self.directional_derivatives(model, closure, params, directions)
        except Exception:
            reference = None  # the general path cannot run this closure: trust the rules
        finally:
            after_forward.rewind()
        _FAST_PATH_VERIFIED.setdefault(model, set()).add(key)
        if reference is None:
            return
        tolerance = 1e-3 * float(reference.abs().max()) + 1e-6
        if not bool((derivatives - reference).abs().max() <= tolerance):
            raise fp.Unsupported("the stacked-tangent rules disagree with forward-mode AD")

    def _verification_key(self) -> tuple:
        # K = 1 and K > 1 take different code in fast_paths; so do the two distributions.
        return (self.tangents == 1, self.distribution)

    def _write_fast_estimate(self, params, source, loss, derivatives) -> torch.Tensor:
        if self.combine == "mean":
            coefficients = tg.mean_coefficients(derivatives)
        else:
            num_params = sum(p.numel() for p in params)
            coefficients = tg.projection_coefficients(derivatives, source.gram(), num_params)
        source.write_grads(coefficients)
        return loss.detach()


class ZerothOrder(_Seeded):
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

    def __init__(
        self,
        tangents: int = 1,
        eps: float = 1e-3,
        distribution: str = "normal",
        seed: int | None = None,
    ):
        _check_zeroth_order_args(tangents, eps, distribution)
        self.tangents, self.eps, self.distribution = tangents, float(eps), distribution
        super().__init__(seed)

    def describe(self) -> str:
        return f"zeroth-order (K={self.tangents}, {self.distribution}, eps={self.eps:g})"

    def _perturbations(self, params: Sequence[torch.Tensor], seed: int) -> Iterator[torch.Tensor]:
        generator = _as_generator(seed, params[0].device)
        for p in params:
            yield tg.sample_tangents([p], 1, self.distribution, generator)[0][0]

    def _shift(self, params: Sequence[torch.Tensor], seed: int, scale: float) -> None:
        for p, z in zip(params, self._perturbations(params, seed)):
            p.add_(z, alpha=scale)

    def estimate(self, model: nn.Module, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        _, params = _trainable(model)
        base = int(torch.randint(0, 2**62, (1,), generator=self.generator(params[0].device)))
        seeds = [base + k for k in range(self.tangents)]
        replay = _Replay(model)
        differences, total = [], 0.0
        with torch.no_grad():
            for k, seed in enumerate(seeds):
                offset = 0.0
                try:
                    losses = []
                    for scale in (self.eps, -2 * self.eps):
                        self._shift(params, seed, scale)
                        offset += scale
                        if k > 0 or losses:
                            replay.rewind()
                        losses.append(_call_closure(closure).detach())
                finally:
                    if offset:
                        self._shift(params, seed, -offset)
                plus, minus = losses
                differences.append((plus - minus) / (2 * self.eps))
                total = total + (plus + minus) / 2
            loss = total / self.tangents
            derivatives = torch.stack(differences)
            _check_finite(loss, derivatives)
            coefficients = tg.mean_coefficients(derivatives)
            for p in params:
                if p.grad is None or p.grad.shape != p.shape:
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad.zero_()
            for c, seed in zip(coefficients.tolist(), seeds):
                for p, z in zip(params, self._perturbations(params, seed)):
                    p.grad.add_(z, alpha=c)
        return loss


class Backprop(Estimator):
    """The exact gradient by reverse-mode autograd (one forward and one backward pass).

    The reference that every other estimator is compared against. ``.grad`` is overwritten.
    """

    name = "backprop"

    def estimate(self, model: nn.Module, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        _, params = _trainable(model)
        with torch.enable_grad():
            loss = _call_closure(closure)
            _check_finite(loss.detach())
            if loss.grad_fn is None:
                raise ValueError(
                    "the loss does not depend on any trainable parameter (or the closure called "
                    "backward or ran under torch.no_grad()); compute it from the model's output."
                )
            # As optimizer.zero_grad() and loss.backward() do it: autograd hands each fresh
            # gradient to .grad, with no copy into the old buffer (the fastest backprop step).
            for p in params:
                p.grad = None
            try:
                torch.autograd.backward(loss, inputs=params)
            except RuntimeError as error:
                if any(s in str(error) for s in _BACKWARD_CALLED):
                    raise ValueError(
                        "the closure called backward(); estimators compute the gradient "
                        "themselves, so return the loss without calling backward."
                    ) from None
                raise
        for p in params:  # a parameter the loss does not use has gradient zero
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return loss.detach()


ESTIMATORS = ("forward", "zeroth-order", "backprop")


def make_estimator(
    name: str,
    tangents: int = 1,
    distribution: str = "normal",
    combine: str = "mean",
    eps: float = 1e-3,
    seed: int | None = None,
) -> Estimator:
    """Build an estimator by name: ``"forward"``, ``"zeroth-order"`` or ``"backprop"``."""
    if name == "forward":
        return ForwardGradient(tangents, distribution, combine, seed)
    if name == "zeroth-order":
        return ZerothOrder(tangents, eps, distribution, seed)
    if name == "backprop":
        return Backprop()
    raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}.")
