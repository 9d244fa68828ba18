"""The variance study: how well an estimate points along the gradient it estimates.

Every ``cosine_every`` steps the loop measures, between the estimate (what the estimator just
wrote into ``.grad``, before the optimizer applies it) and the exact gradient (autograd) of the
loss that estimator targets, on the same batch and parameters, the cosine similarity

    cos = ⟨ĝ, ∇L⟩ / (‖ĝ‖ ‖∇L‖),

logged as ``cosine_to_gradient``. Backprop gives 1; one random Gaussian tangent in n dimensions
gives E[cos²] ≈ 1/n, which is why weight-perturbed forward gradients slow down as models grow.

The target is the model's end-to-end loss (the batch's mean loss) for plain estimators; with
local losses, the sum of the blocks' local losses Σ_l L_l; with local guesses, ∇ of the
end-to-end loss for the blocks' parameters and of the local losses for the heads' (the guess
projects the end-to-end loss onto each block's local direction; the heads learn locally).

The measurement leaves training as it was: it runs outside the timed step and the memory peak,
puts back every global random state and the model's buffers, and leaves ``.grad`` untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from forwardgrad.experiments.callbacks import Callback, StepRecord, due
from forwardgrad.experiments.schema import COSINE_COLUMN

if TYPE_CHECKING:
    from forwardgrad.experiments.runstate import RunState

# The loss an estimate targets (see the module docstring).
END_TO_END, LOCAL, GUESS = "end-to-end", "local", "guess"


def target_of(config) -> str:
    """The loss the run's estimator targets: ``END_TO_END``, ``LOCAL`` or ``GUESS``."""
    if not config.local_losses:
        return END_TO_END
    return GUESS if config.guess is not None else LOCAL


def target_gradient(
    model: nn.Module, target: str, images: torch.Tensor | None, labels: torch.Tensor | None
) -> list[torch.Tensor]:
    """The exact gradient of the loss ``target`` names, by autograd, one tensor per parameter
    of ``model`` (``.grad`` is not touched). With ``images`` None the model is a test function
    and its value is the loss."""
    params = list(model.parameters())

    def end_to_end() -> torch.Tensor:
        return model() if images is None else F.cross_entropy(model(images), labels)

    with torch.enable_grad():
        if target == END_TO_END:
            return list(torch.autograd.grad(end_to_end(), params, allow_unused=True))
        local = torch.autograd.grad(model.loss(images, labels), params, allow_unused=True)
        if target == LOCAL:
            return list(local)
        body = list(model.blocks.parameters())
        exact = dict(zip(map(id, body), torch.autograd.grad(end_to_end(), body)))
        return [exact.get(id(p), g) for p, g in zip(params, local)]


def cosine(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> float:
    """The cosine similarity of two gradients given as lists of tensors (None: zeros), in
    double precision; 0 where either is zero."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None or y is not None]
    u = [(x if x is not None else torch.zeros_like(y)).detach().flatten() for x, y in pairs]
    v = [(y if y is not None else torch.zeros_like(x)).detach().flatten() for x, y in pairs]
    if not pairs:
        return 0.0
    u, v = torch.cat(u).double(), torch.cat(v).double()
    return float(u @ v / (u.norm() * v.norm()).clamp_min(1e-300))


@contextlib.contextmanager
def unchanged(model: nn.Module) -> Iterator[None]:
    """Every global random state and the model's buffers (batch-norm statistics) as they were
    before, whatever the block computes."""
    buffers = [buffer.detach().clone() for buffer in model.buffers()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)


def cosine_to_target(
    model: nn.Module, target: str, batch: Any, estimate: Sequence[torch.Tensor | None]
) -> float:
    """The cosine between ``estimate`` and the exact gradient of ``target`` on ``batch`` (a
    task's batch: ``(images, labels)``, or None for a test function)."""
    images, labels = batch if batch is not None else (None, None)
    with unchanged(model):
        exact = target_gradient(model, target, images, labels)
    return cosine(estimate, exact)


class GradientCosine(Callback):
    """Every ``every`` steps, between the estimate and the optimizer step, logs the cosine of
    the estimate with its target gradient (rank 0 only, untimed)."""

    def __init__(self, every: int, target: str):
        self.every, self.target = every, target

    def after_estimate(self, run: RunState, record: StepRecord, batch: Any) -> None:
        if not due(record.step, self.every) or not run.is_main:
            return
        with run.untimed():
            estimate = [p.grad for p in run.model.parameters()]
            record.values[COSINE_COLUMN] = cosine_to_target(run.model, self.target, batch, estimate)
