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
