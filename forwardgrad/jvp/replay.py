"""Rewinding a model's state so that several evaluations count as one ordinary forward."""

from __future__ import annotations

import torch
from torch import nn


class Replay:
    """Buffers and RNG states at one moment, to re-run a forward as if it were the first.

    Several evaluations that must count as one ordinary forward (K tangents evaluated one by
    one, the two points of a central difference, a check of the fast path against the general
    one) rewind to this snapshot before each, so that BatchNorm's running statistics are updated
    once and Dropout draws the same mask each time.
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
        self.rng = rng_states()

    def rewind(self) -> None:
        for module, name, b in self.slots:
            module._buffers[name] = b
        with torch.no_grad():
            for buffer, saved in self.buffers:
                buffer.copy_(saved)
        restore_rng_states(self.rng)


def rng_states() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """torch's CPU RNG state, and the CUDA devices' once CUDA is in use."""
    cuda = (
        torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None
    )
    return torch.get_rng_state(), cuda


def restore_rng_states(states: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    """Put back what ``rng_states`` returned."""
    cpu, cuda = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
