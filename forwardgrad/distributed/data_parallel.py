"""Data-parallel training on ``torch.distributed`` that communicates K + 1 numbers per step.

The forward gradient is g = Σ_k c(d)_k v_k, where the tangents v_k come from the estimator's
seeded generator and d_k = ∇L·v_k. Split the global batch B into disjoint shards B_r; the loss
is a mean, so L = Σ_r w_r L_r with w_r = |B_r| / |B|, and by linearity d_k = Σ_r w_r ∇L_r·v_k.
Each of the N ranks therefore

1. draws the step's K tangents from the shared seed (the same numbers on every rank),
2. computes w_r L_r and the K derivatives w_r ∇L_r·v_k on its shard with the derivative engine
   (the fast path, as on one process),
3. all-reduces (sums) those K + 1 numbers,
4. forms g from the summed derivatives and its own copy of the tangents, and steps.

Every rank ends the step with the same parameters, those of one process on the whole batch (to
floating-point rounding). ``DataParallel`` works for any estimator: it hands the estimator a
``reducer`` that sums over the ranks, and the estimator decides what to sum (the forward
gradient its K + 1 numbers, zeroth-order each of its 2K loss values, backprop every gradient
through ``DistributedDataParallel``, set up by its ``prepare``).

Typical use (what ``forwardgrad train`` does under ``torchrun``)::

    with process_group() as world:            # reads RANK, WORLD_SIZE, ... from torchrun
        estimator = DataParallel(make_estimator("forward", seed=0), world)
        forward_model = estimator.prepare(model)      # rank 0's parameters everywhere
        for step, batch in enumerate(global_batches):  # the same batches on every rank
            shard, weight = world.shard(batch)
            closure = weighted(lambda: loss_fn(forward_model, shard), weight)
            estimator.estimate(model, closure)
            optimizer.step()
            if step % 200 == 0:
                world.check_parameters(model, step)

Requirements: every rank runs the same code on the same global batches, with the same seed and
the same model. Models whose forward depends on the batch as a whole (BatchNorm in training mode)
or on random draws (Dropout) see only their shard, so they are not equivalent to one process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from forwardgrad.distributed.world import World
from forwardgrad.errors import ConfigurationError, NonFiniteLoss
from forwardgrad.estimators.base import Estimator, Wrapper


class _WorldReducer:
    """Sums over the ranks of a ``World``: what ``DataParallel`` hands its estimator."""

    def __init__(self, world: World):
        self.world = world

    def sum(self, values: torch.Tensor, what: str) -> torch.Tensor:
        return self.world.all_reduce(values, what)

    def collective(self, what: str) -> contextlib.AbstractContextManager:
        return self.world._collective(what)


def _summing_hook(world, bucket):
    """DDP communication hook: sum the bucket over the ranks (the loss is already weighted by
    w_r, so the sum is the gradient of the global mean), counting the bytes.

    (No annotations: DDP checks them at run time, and this module's are strings.)
    """
    buffer = bucket.buffer()
    world.bytes_communicated += buffer.numel() * buffer.element_size()
    work = dist.all_reduce(buffer, group=world.group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def wrap_for_backprop(model: nn.Module, world: World) -> nn.Module:
    """``model`` in ``DistributedDataParallel``, summing gradients with ``world``'s group."""
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    device_ids = [device] if device.type == "cuda" else None
    with world._collective("wrapping the model in DistributedDataParallel"):
        ddp = DistributedDataParallel(model, device_ids=device_ids, process_group=world.group)
    ddp.register_comm_hook(world, _summing_hook)
    return ddp


class DataParallel(Wrapper, Estimator):
    """Run an estimator data-parallel: each rank estimates on its shard; the ranks agree.

    The closure given to ``estimate`` returns this rank's weighted loss w_r L_r (see
    ``weighted`` and ``World.shard``), so that the sum over the ranks is the global loss.
    Numbers travel as float64. ``state_dict`` is the wrapped estimator's, so checkpoints are
    interchangeable with single-process runs; ``last_path`` and ``last_fallback`` are its too.

    Args:
        estimator: any ``Estimator`` (``ForwardGradient``, ``ZerothOrder``, ``Backprop``, ...);
            it must have the same seed on every rank.
        world: this process's ``World``.

    Attributes:
        bytes_last_step: bytes this rank handed to all-reduces during the latest ``estimate``.
    """

    def __init__(self, estimator: Estimator, world: World):
        if not isinstance(estimator, Estimator):
            raise TypeError(
                "DataParallel runs an Estimator (ForwardGradient, ZerothOrder or Backprop, ...), "
                f"got {type(estimator).__name__}."
            )
        if not isinstance(world, World):
            raise TypeError(f"world must be a World (see process_group), got {world!r}.")
        self.estimator, self.world = estimator, world
        self.name = estimator.name
        self.bytes_last_step = 0
        self._prepared = False
        estimator.reducer = _WorldReducer(world)

    def describe(self) -> str:
        return self.estimator.describe()

    def state_dict(self) -> dict:
        return self.estimator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.estimator.load_state_dict(state)

    def prepare(self, model: nn.Module, world: World | None = None) -> nn.Module:
        """Give every rank rank 0's parameters; return the module the closure must call
        (for ``Backprop`` a ``DistributedDataParallel`` wrapper sharing ``model``'s parameters;
        otherwise ``model`` itself)."""
        self.world.broadcast_module(model)
        self._prepared = True
        return self.estimator.prepare(model, self.world)

    def bytes_per_step(self, model: nn.Module) -> int:
        """The bytes one rank hands to all-reduces per step, from the estimator and the model."""
        return self.estimator.bytes_per_step(model)

    def estimate(self, model: nn.Module, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        if not self._prepared and type(self.estimator).prepare is not Estimator.prepare:
            raise ConfigurationError(
                f"call prepare(model) before estimate: {self.estimator.name} runs with the "
                "module prepare returns, and the closure must call that module."
            )
        self.bytes_last_step = 0
        before = self.world.bytes_communicated
        try:
            return self.estimator.estimate(model, closure)
        except NonFiniteLoss as error:  # summed over the ranks: every rank stops here
            raise NonFiniteLoss(error.value, f"{error.what} summed over the ranks") from None
        finally:
            self.bytes_last_step = self.world.bytes_communicated - before
