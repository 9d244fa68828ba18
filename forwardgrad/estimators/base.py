"""What every estimator shares: the protocol, the checks, and writing ``.grad``.

``loss = estimator.estimate(model, closure)`` overwrites ``.grad`` of the model's trainable
parameters with a gradient estimate and returns the loss, detached; any ``torch.optim``
optimizer then applies the step. ``closure()`` takes no arguments, returns the loss computed
with ``model`` and must not call ``backward()``. Afterwards the model holds its own parameters
again, with no dual tensors, hooks or perturbations left behind, also when the closure raises.

An estimator also tells a data-parallel wrapper what it communicates: ``bytes_per_step``,
``prepare`` and the ``reducer`` it sums its numbers with (see ``forwardgrad.distributed``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from forwardgrad.errors import ConfigurationError, EstimatorError, NonFiniteLoss
from forwardgrad.seeds import seeded_generator

WIRE_BYTES = 8  # what data-parallel ranks sum travels as float64


class Reducer(Protocol):
    """Sums numbers over the processes of a data-parallel job (``DataParallel`` provides it)."""

    def sum(self, values: torch.Tensor, what: str) -> torch.Tensor:
        """Σ over the processes of ``values``, in float64."""

    def collective(self, what: str) -> contextlib.AbstractContextManager:
        """A context for collectives that run inside PyTorch (DDP's gradient all-reduce)."""


class Estimator:
    """The protocol (see the module docstring).

    Attributes:
        name: how the registry, the command line and reports call it.
        reducer: ``None`` on one process; set by ``DataParallel`` to sum over the ranks.
        last_path: the derivative path of the latest estimate (``"fast"``, ``"general"``), for
            forward-mode estimators; ``None`` for the others.
        last_fallback: ``None``, or the sentence that says why the general path ran.
    """

    name = "estimator"
    reducer: Reducer | None = None
    last_path: str | None = None
    last_fallback: str | None = None

    def estimate(self, model: nn.Module, closure) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def describe(self) -> str:
        return self.name

    def bytes_per_step(self, model: nn.Module) -> int:
        """The bytes one process hands to the sums over the processes per step, data-parallel
        (numbers it sums itself travel as float64: ``WIRE_BYTES`` each)."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, world) -> nn.Module:
        """The module a data-parallel closure must call (the model itself by default)."""
        return model

    def reduced(self, values: torch.Tensor, what: str) -> torch.Tensor:
        """``values`` summed over the processes (as they are on one process)."""
        if self.reducer is None:
            return values
        total = self.reducer.sum(values, what)
        return total.to(device=values.device, dtype=values.dtype)


class Wrapper:
    """Something that runs an inner ``estimator`` (``DataParallel``, ``ForwardSGD``) and reports
    the derivative path of its latest step as its own."""

    estimator: Estimator

    @property
    def last_path(self) -> str | None:
        return self.estimator.last_path

    @property
    def last_fallback(self) -> str | None:
        return self.estimator.last_fallback


class Seeded(Estimator):
    """An estimator whose randomness comes from its own generator, never the global one."""

    def __init__(self, seed: int | None):
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigurationError(f"seed must be an integer or None, got {seed!r}.")
        # Drawn from torch's global generator, so torch.manual_seed makes an unseeded estimator
        # reproducible too.
        self.seed = int(torch.randint(0, 2**62, (1,))) if seed is None else int(seed)
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device | str) -> torch.Generator:
        """This estimator's generator on ``device``, seeded by the seed alone.

        The stream must not depend on the device index: data-parallel ranks on cuda:0 and
        cuda:1 have to draw the same tangents.
        """
        device = torch.device(device)
        key = str(device)
        if key not in self._generators:
            self._generators[key] = seeded_generator(self.seed, device)
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


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters once each (tied weights appear once), in ``parameters()`` order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}.")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigurationError(
            f"{type(model).__name__} has no parameter with requires_grad=True; there is nothing "
            "to estimate a gradient for."
        )
    meta = [p for p in params if p.is_meta]
    if meta:
        raise ConfigurationError(
            f"{type(model).__name__} has parameters on the meta device (no values); "
            "materialise them first, e.g. model.to_empty(device='cpu') and initialise them."
        )
    return params


def check_finite(loss: torch.Tensor, derivatives: torch.Tensor | None = None) -> None:
    """Raise ``NonFiniteLoss`` if the loss or a directional derivative is NaN or infinite."""
    if not bool(torch.isfinite(loss).all()):
        bad = loss[~torch.isfinite(loss)].reshape(-1)[0] if loss.dim() else loss
        raise NonFiniteLoss(float(bad), "the loss")
    if derivatives is not None and not bool(torch.isfinite(derivatives).all()):
        raise NonFiniteLoss(
            float(derivatives[~torch.isfinite(derivatives)].reshape(-1)[0]),
            "a directional derivative",
            "the model was left unchanged; lower the learning rate or check the model for "
            "operations that overflow.",
        )


def write_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """Overwrite ``.grad`` (not accumulate): an estimate replaces whatever was there."""
    for p, g in zip(params, grads):
        g = g.detach().to(dtype=p.dtype)
        if p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype:
            p.grad.copy_(g)
        else:
            p.grad = g.clone() if g.data_ptr() == p.data_ptr() else g


__all__ = [
    "Estimator",
    "EstimatorError",
    "Reducer",
    "Seeded",
    "check_finite",
    "trainable",
    "write_grads",
]
