"""Exact gradients by reverse-mode autograd: the reference every other estimator is compared to."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch
from torch import nn

from forwardgrad.errors import EstimatorError
from forwardgrad.estimators.base import WIRE_BYTES, Estimator, check_finite, trainable
from forwardgrad.estimators.forward import check_params
from forwardgrad.jvp.checks import backward_not_called, check_value, guarded


def backprop_grad(
    fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], params: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The exact gradient by reverse-mode autograd: the reference for every other estimator."""
    names, values = check_params(params)
    leaves = [p.clone().requires_grad_(True) for p in values]
    with torch.enable_grad():
        value = check_value(fn(dict(zip(names, leaves))), detach=False)
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
    value = value.detach()
    check_finite(value)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(values, grads)]
    return value, dict(zip(names, grads))


class Backprop(Estimator):
    """The exact gradient by reverse-mode autograd (one forward and one backward pass).

    The reference that every other estimator is compared against. ``.grad`` is overwritten. In a
    data-parallel job ``prepare`` wraps the model in ``DistributedDataParallel``, which sums
    every gradient over the ranks: n + 1 numbers per step (the gradients and the loss).
    """

    name = "backprop"
    options = ()

    def bytes_per_step(self, model: nn.Module) -> int:
        gradients = sum(p.numel() * p.element_size() for p in trainable(model))
        return gradients + WIRE_BYTES  # every gradient through DDP, and the loss

    def prepare(self, model: nn.Module, world) -> nn.Module:
        from forwardgrad.distributed.data_parallel import wrap_for_backprop

        return wrap_for_backprop(model, world)

    def estimate(self, model: nn.Module, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        params = trainable(model)
        with torch.enable_grad():
            loss = check_value(guarded(closure)(), detach=False)
            check_finite(loss.detach())
            if loss.grad_fn is None:
                raise EstimatorError(
                    "the loss does not depend on any trainable parameter (or the closure called "
                    "backward or ran under torch.no_grad()); compute it from the model's output."
                )
            # As optimizer.zero_grad() and loss.backward() do it: autograd hands each fresh
            # gradient to .grad, with no copy into the old buffer (the fastest backprop step).
            for p in params:
                p.grad = None
            collective = contextlib.nullcontext()
            if self.reducer is not None:  # DistributedDataParallel sums inside backward
                collective = self.reducer.collective("the all-reduce of the gradients")
            with collective, backward_not_called():
                torch.autograd.backward(loss, inputs=params)
        for p in params:  # a parameter the loss does not use has gradient zero
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        total = self.reduced(loss.detach().reshape(1), "the all-reduce of the loss")
        check_finite(total)
        return total[0]
