"""Data-parallel training on ``torch.distributed`` that communicates K + 1 numbers per step.

The forward gradient is g = Σ_k c(d)_k v_k, where the tangents v_k come from the estimator's
seeded generator and d_k = ∇L·v_k. Split the global batch B into disjoint shards B_r; the loss
is a mean, so L = Σ_r w_r L_r with w_r = |B_r| / |B|, and by linearity d_k = Σ_r w_r ∇L_r·v_k.
Each of the N ranks therefore

1. draws the step's K tangents from the shared seed (the same numbers on every rank),
2. computes w_r L_r and the K derivatives w_r ∇L_r·v_k on its shard by forward-mode AD,
3. all-reduces (sums) those K + 1 numbers,
4. forms g from the summed derivatives and its own copy of the tangents, and steps.

Every rank ends the step with the same parameters, those of one process on the whole batch (to
floating-point rounding). Per step that is K + 1 numbers on the wire whatever the model's size.
Zeroth-order (SPSA) works the same way with its 2K loss values. Backprop, the baseline, runs
under ``DistributedDataParallel``, which all-reduces every gradient: n numbers per step.

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
import datetime
import hashlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from forwardgrad.errors import DistributedError, EstimatorError, NonFiniteLoss
from forwardgrad.estimators import Backprop, Estimator, ForwardGradient, ZerothOrder

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_CHECK_EVERY = 200
TIMEOUT_VARIABLE = "FORWARDGRAD_TIMEOUT_S"
# Reduced numbers travel as float64: exact for one rank, and the sum loses nothing to float32.
WIRE_DTYPE = torch.float64
# What a NonFiniteLoss of a data-parallel step names: the same type as on one process.
_SUMMED_LOSS = "the loss summed over the ranks"
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class RankFailure(DistributedError):
    """A collective failed: another rank died, or hung past the process group's timeout."""


class RanksDisagree(DistributedError):
    """The ranks' parameters differ: they no longer train the same model.

    Attributes:
        step: the step at which the checksums were compared.
        ranks: the ranks whose parameters differ from rank 0's.
    """

    def __init__(self, message: str, step: int, ranks: list[int]):
        super().__init__(message)
        self.step, self.ranks = step, ranks


# --------------------------------------------------------------------------- the launch


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a job, as ``torchrun`` describes it in the environment.

    Attributes:
        rank: 0 .. world_size - 1, this process's place among all processes.
        world_size: N, the number of processes.
        local_rank: this process's place on its machine (selects its GPU).
        master_addr, master_port: where rank 0 listens for the others.
        restart_count: how often ``torchrun --max-restarts`` has restarted the job (0 at first).
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    restart_count: int = 0


def _integer_variable(environ: Mapping[str, str], name: str, low: int) -> int:
    value = environ[name]
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if number < low:
        raise DistributedError(
            f"the environment variable {name}={value!r} should be an integer >= {low}; launch "
            "with torchrun, which sets it."
        )
    return number


def detect_launch(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The ``Launch`` that ``torchrun`` (or any ``env://`` launcher) describes, else None.

    A launch is recognised by ``RANK`` and ``WORLD_SIZE``; ``MASTER_ADDR`` and ``MASTER_PORT``
    must then be set too, and ``LOCAL_RANK`` defaults to ``RANK``.

    Args:
        environ: the environment to read; ``os.environ`` by default.

    Returns:
        A ``Launch``, or None when the process was started alone.

    Raises:
        DistributedError: the variables are incomplete or malformed.
    """
    environ = os.environ if environ is None else environ
    if "RANK" not in environ and "WORLD_SIZE" not in environ:
        return None
    missing = [name for name in _LAUNCH_VARIABLES if name not in environ and name != "LOCAL_RANK"]
    if missing:
        raise DistributedError(
            f"this looks like a distributed launch but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set; launch with torchrun, e.g. "
            "torchrun --nproc_per_node 2 -m forwardgrad train ..."
        )
    world_size = _integer_variable(environ, "WORLD_SIZE", 1)
    rank = _integer_variable(environ, "RANK", 0)
    if rank >= world_size:
        raise DistributedError(f"RANK={rank} must be below WORLD_SIZE={world_size}.")
    local_rank = _integer_variable(environ, "LOCAL_RANK", 0) if "LOCAL_RANK" in environ else rank
    restarts = environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return Launch(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        master_addr=environ["MASTER_ADDR"],
        master_port=_integer_variable(environ, "MASTER_PORT", 1),
        restart_count=int(restarts) if restarts.isdigit() else 0,
    )


# --------------------------------------------------------------------------- the world


def shard_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s part ``[start, stop)`` of ``size`` items.

    Parts are contiguous and in rank order, so together they are the whole in its order; their
    sizes differ by at most one (the first ``size % world_size`` ranks take one more).
    """
    if world_size < 1 or not 0 <= rank < world_size or size < 0:
        raise ValueError(
            f"need 0 <= rank < world_size and size >= 0, got rank {rank}, world_size "
            f"{world_size}, size {size}."
        )
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_batch(batch: object, rank: int, world_size: int) -> tuple[object, float]:
    """This rank's shard of a global batch and its weight w_r = |shard| / |batch|.

    Args:
        batch: a tensor, or a tuple or list of tensors that share their first dimension
            (e.g. ``(images, labels)``); None for problems without data (test functions).
        rank, world_size: this rank and the number of ranks.

    Returns:
        ``(shard, weight)``. The weights of all ranks sum to 1, so Σ_r w_r L_r is the mean loss
        of the whole batch. A rank whose shard would be empty (a batch smaller than the world)
        gets the batch's first example with weight 0, so that it still runs the same forward
        (and DDP's backward) as the others. Without data (None), rank 0 has weight 1, the others
        weight 0.
    """
    if batch is None:
        return None, 1.0 if rank == 0 else 0.0
    tensors = [batch] if isinstance(batch, torch.Tensor) else batch
    if not isinstance(tensors, (tuple, list)) or not all(
        isinstance(t, torch.Tensor) and t.dim() > 0 for t in tensors
    ):
        raise TypeError(
            f"a batch must be a tensor or a tuple/list of tensors, got {type(batch).__name__}."
        )
    sizes = {len(t) for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"the batch's tensors have different lengths {sorted(sizes)}.")
    size = sizes.pop()
    start, stop = shard_bounds(size, rank, world_size)
    weight = (stop - start) / size if size else 0.0
    if stop == start:
        start, stop = 0, min(1, size)
    parts = [t[start:stop] for t in tensors]
    shard = parts[0] if isinstance(batch, torch.Tensor) else type(batch)(parts)
    return shard, weight


def weighted(closure: Callable[[], torch.Tensor], weight: float) -> Callable[[], torch.Tensor]:
    """The closure w_r · L_r: this rank's share of the mean loss of the global batch."""
    if weight == 1.0:
        return closure
    return lambda: closure() * weight


class World:
    """One process's handle on a running process group: its rank and the collectives it needs.

    Every collective here counts the bytes it hands to ``torch.distributed`` (the payload one
    rank contributes; a ring all-reduce moves about 2(N − 1)/N times that per rank) and turns a
    failure (a dead or hung rank) into a ``RankFailure`` that says so.

    Attributes:
        rank, world_size, local_rank: as in ``Launch``.
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (GPU).
        device: where communicated tensors live (the CPU for gloo, this rank's GPU for nccl).
        timeout_s: how long a collective waits for the other ranks before failing.
        restart_count: how often torchrun has restarted the job (see ``Launch``).
        bytes_communicated: bytes handed to collectives so far.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        local_rank: int = 0,
        backend: str = "gloo",
        device: torch.device | str = "cpu",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        group: dist.ProcessGroup | None = None,
        restart_count: int = 0,
    ):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.backend, self.device, self.timeout_s = backend, torch.device(device), timeout_s
        self.group, self.restart_count = group, restart_count
        self.bytes_communicated = 0

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that logs, checkpoints and reports."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, world_size={self.world_size}, backend={self.backend!r})"

    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except (RuntimeError, dist.DistError) as error:
            if isinstance(error, DistributedError):
                raise
            cause = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise RankFailure(
                f"rank {self.rank} of {self.world_size}: {what} failed: another rank died, or "
                f"hung for more than the {self.timeout_s:g} s timeout (see that rank's log; "
                f"{TIMEOUT_VARIABLE} sets the timeout). Restart from the last checkpoint with "
                f"--resume, or let torchrun --max-restarts do it. The backend said: {cause}"
            ) from error

    def all_reduce(self, values: torch.Tensor, what: str) -> torch.Tensor:
        """Σ over the ranks of ``values`` (a new float64 tensor on ``self.device``)."""
        buffer = values.detach().to(device=self.device, dtype=WIRE_DTYPE).clone()
        self.bytes_communicated += buffer.numel() * buffer.element_size()
        with self._collective(what):
            dist.all_reduce(buffer, group=self.group)
        return buffer

    def all_gather(self, values: torch.Tensor, what: str) -> torch.Tensor:
        """Every rank's ``values``, stacked in rank order: shape ``(world_size, *values.shape)``."""
        local = values.detach().to(self.device).contiguous()
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        self.bytes_communicated += local.numel() * local.element_size()
        with self._collective(what):
            dist.all_gather(gathered, local, group=self.group)
        return torch.stack(gathered)

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into every rank's ``module``."""
        with torch.no_grad(), self._collective("the broadcast of rank 0's parameters"):
            for tensor in [*module.parameters(), *module.buffers()]:
                on_device = tensor.detach().to(self.device)
                self.bytes_communicated += on_device.numel() * on_device.element_size()
                dist.broadcast(on_device, src=0, group=self.group)
                if on_device is not tensor:
                    tensor.copy_(on_device)

    def broadcast_object(self, value: object, what: str) -> object:
        """Rank 0's ``value`` (anything picklable) on every rank: for decisions all must share."""
        box = [value]
        with self._collective(what):
            dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier_flag(self, ok: bool, what: str) -> bool:
        """Whether every rank passed ``ok=True``: a barrier that also carries success."""
        failed = self.all_reduce(torch.tensor([0.0 if ok else 1.0]), what)
        return float(failed) == 0.0

    @contextlib.contextmanager
    def main_first(self, what: str) -> Iterator[None]:
        """Run the body on rank 0 first, then on the others (e.g. a download into a shared cache).

        If rank 0's body raises, the other ranks raise a ``DistributedError`` instead of
        waiting for a timeout.
        """
        if self.is_main:
            ok = False
            try:
                yield
                ok = True
            finally:
                self.barrier_flag(ok, f"waiting for rank 0 while {what}")
        else:
            if not self.barrier_flag(True, f"waiting for rank 0 while {what}"):
                raise DistributedError(f"rank 0 failed while {what}; its error message says why.")
            yield

    def shard(self, batch: object) -> tuple[object, float]:
        """This rank's shard of ``batch`` and its weight; see ``shard_batch``."""
        return shard_batch(batch, self.rank, self.world_size)

    def check_parameters(self, module: nn.Module, step: int) -> None:
        """Raise ``RanksDisagree`` unless every rank's parameters are bit for bit rank 0's.

        Costs one SHA-256 of the parameters and an all-gather of 8 bytes per rank; run it every
        few hundred steps. All ranks apply identical updates computed from identical numbers,
        so on identical hardware they stay identical to the bit.
        """
        local = torch.tensor([parameter_checksum(module)], dtype=torch.int64)
        everyone = self.all_gather(local, f"the parameter checksum at step {step}").flatten()
        different = [r for r in range(self.world_size) if int(everyone[r]) != int(everyone[0])]
        if different:
            raise RanksDisagree(
                f"at step {step} the parameters of rank(s) {', '.join(map(str, different))} "
                "differ from rank 0's: the ranks no longer train the same model (different "
                "data, seeds or code on some rank, or a nondeterministic kernel); restart from "
                "the last checkpoint.",
                step,
                different,
            )


def parameter_checksum(module: nn.Module) -> int:
    """A 63-bit integer digest (SHA-256) of the bytes of ``module``'s parameters, in order."""
    digest = hashlib.sha256()
    for p in module.parameters():
        data = p.detach().contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).cpu().numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def timeout_from_environment(environ: Mapping[str, str] | None = None) -> float:
    """``FORWARDGRAD_TIMEOUT_S`` if set (seconds, > 0), else ``DEFAULT_TIMEOUT_S``."""
    environ = os.environ if environ is None else environ
    value = environ.get(TIMEOUT_VARIABLE)
    if value is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and seconds > 0):
        raise DistributedError(
            f"{TIMEOUT_VARIABLE}={value!r} should be a positive number of seconds, e.g. 300."
        )
    return seconds


@contextlib.contextmanager
def process_group(
    launch: Launch | None = None,
    backend: str | None = None,
    timeout_s: float | None = None,
) -> Iterator[World]:
    """Join the job's process group for the body, and leave it afterwards.

    Args:
        launch: where this process sits; by default read from the environment
            (``detect_launch``), as set by ``torchrun``.
        backend: ``"gloo"`` or ``"nccl"``; by default nccl when CUDA is available and this
            rank has a GPU (``local_rank`` < the number of GPUs), else gloo.
        timeout_s: how long a collective (and the rendezvous) waits for the others before
            failing; by default ``timeout_from_environment()``.

    Yields:
        The ``World`` of this process.

    Raises:
        DistributedError: not launched by torchrun, a process group already exists, or the
            other ranks did not arrive within the timeout.
    """
    # Under torchrun the rendezvous store may be the agent's: only env:// knows how to reach it.
    from_environment = launch is None
    launch = launch if launch is not None else detect_launch()
    if launch is None:
        raise DistributedError(
            "no distributed launch found (RANK and WORLD_SIZE are not set); start the job with "
            "torchrun, e.g. torchrun --nproc_per_node 2 -m forwardgrad train ..."
        )
    if dist.is_initialized():
        raise DistributedError(
            "a torch.distributed process group is already running in this process; use it, or "
            "leave it (destroy_process_group) before joining another."
        )
    timeout_s = timeout_from_environment() if timeout_s is None else float(timeout_s)
    if backend is None:
        has_gpu = torch.cuda.is_available() and launch.local_rank < torch.cuda.device_count()
        backend = "nccl" if has_gpu and dist.is_nccl_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"unknown backend {backend!r}; choose gloo (CPU) or nccl (GPU).")
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    url = (
        "env://" if from_environment else f"tcp://{_host(launch.master_addr)}:{launch.master_port}"
    )
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store, _, _ = next(dist.rendezvous(url, launch.rank, launch.world_size, timeout=timeout))
        # After a restart (torchrun --max-restarts) the store may still hold the failed attempt's
        # keys, which would send gloo to processes that are gone: each attempt gets its own.
        store = dist.PrefixStore(f"forwardgrad/attempt-{launch.restart_count}", store)
        dist.init_process_group(
            backend, store=store, rank=launch.rank, world_size=launch.world_size, timeout=timeout
        )
    except (RuntimeError, dist.DistError) as error:
        raise DistributedError(
            f"rank {launch.rank} could not join the {launch.world_size} processes at "
            f"{launch.master_addr}:{launch.master_port} within {timeout_s:g} s ({error}); "
            "check that every rank was started with the same MASTER_ADDR and MASTER_PORT."
        ) from error
    world = World(
        launch.rank,
        launch.world_size,
        launch.local_rank,
        backend,
        device,
        timeout_s,
        restart_count=launch.restart_count,
    )
    try:
        yield world
    finally:
        dist.destroy_process_group()


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


# --------------------------------------------------------------------------- the estimator


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"{type(module).__name__} has no parameter with requires_grad=True; there is "
            "nothing to train."
        )
    return params


def _scalar(loss: object) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        raise TypeError("the closure must return the scalar floating-point loss tensor.")
    return loss.reshape(())


def _overwrite_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.detach().to(dtype=p.dtype, device=p.device)


def _summing_hook(state, bucket):
    """DDP communication hook: sum the bucket over the ranks (the loss is already weighted by
    w_r, so the sum is the gradient of the global mean), counting the bytes.

    (No annotations: DDP checks them at run time, and this module's are strings.)
    """
    buffer = bucket.buffer()
    state.count_bytes(buffer.numel() * buffer.element_size())
    work = dist.all_reduce(buffer, group=state.world.group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


class DataParallel(Estimator):
    """Run an estimator data-parallel: each rank estimates on its shard; the ranks agree.

    The closure given to ``estimate`` returns this rank's weighted loss w_r L_r (see
    ``weighted`` and ``World.shard``), so that the sum over the ranks is the global loss.

    - ``ForwardGradient``: every rank draws the same K tangents (same seed), computes the K
      derivatives of w_r L_r by forward-mode AD and all-reduces them with the loss: K + 1
      numbers. The estimate is then formed from the summed derivatives on every rank.
    - ``ZerothOrder``: every closure call (2K per step) all-reduces one loss value; the
      perturbations come from the shared seed: 2K numbers.
    - ``Backprop``: ``prepare`` wraps the model in ``DistributedDataParallel``, which
      all-reduces every gradient (n numbers), plus the loss (1 number) for logging.

    Numbers travel as float64. ``state_dict`` is the wrapped estimator's, so checkpoints are
    interchangeable with single-process runs.

    Args:
        estimator: a ``ForwardGradient``, ``ZerothOrder`` or ``Backprop``; it must have the
            same seed on every rank.
        world: this process's ``World``.

    Attributes:
        bytes_last_step: bytes this rank handed to all-reduces during the latest ``estimate``.
    """

    def __init__(self, estimator: Estimator, world: World):
        if not isinstance(estimator, (ForwardGradient, ZerothOrder, Backprop)):
            raise TypeError(
                f"DataParallel runs ForwardGradient, ZerothOrder or Backprop, got "
                f"{type(estimator).__name__}."
            )
        if not isinstance(world, World):
            raise TypeError(f"world must be a World (see process_group), got {world!r}.")
        self.estimator, self.world = estimator, world
        self.name = estimator.name
        self.bytes_last_step = 0
        self._ddp: nn.Module | None = None

    def describe(self) -> str:
        return self.estimator.describe()

    def state_dict(self) -> dict:
        return self.estimator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.estimator.load_state_dict(state)

    def count_bytes(self, count: int) -> None:
        self.world.bytes_communicated += count

    def prepare(self, model: nn.Module) -> nn.Module:
        """Give every rank rank 0's parameters; return the module the closure must call.

        For ``Backprop`` that is a ``DistributedDataParallel`` wrapper of ``model`` (sharing
        its parameters); otherwise ``model`` itself.
        """
        self.world.broadcast_module(model)
        if not isinstance(self.estimator, Backprop):
            return model
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        device_ids = [device] if device.type == "cuda" else None
        with self.world._collective("wrapping the model in DistributedDataParallel"):
            ddp = DistributedDataParallel(
                model, device_ids=device_ids, process_group=self.world.group
            )
        ddp.register_comm_hook(self, _summing_hook)
        self._ddp = ddp
        return ddp

    def bytes_per_step(self, model: nn.Module) -> int:
        """The bytes one rank hands to all-reduces per step, from the estimator and the model."""
        width = torch.finfo(WIRE_DTYPE).bits // 8
        if isinstance(self.estimator, ForwardGradient):
            return width * (self.estimator.tangents + 1)
        if isinstance(self.estimator, ZerothOrder):
            return width * 2 * self.estimator.tangents
        gradients = sum(p.numel() * p.element_size() for p in _trainable(model))
        return gradients + width

    def estimate(self, model: nn.Module, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.bytes_last_step = 0
        before = self.world.bytes_communicated
        if isinstance(self.estimator, ForwardGradient):
            loss = self._forward(model, closure)
        elif isinstance(self.estimator, ZerothOrder):
            loss = self._zeroth_order(model, closure)
        else:
            loss = self._backprop(model, closure)
        self.bytes_last_step = self.world.bytes_communicated - before
        return loss

    def _forward(self, model: nn.Module, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        estimator: ForwardGradient = self.estimator  # type: ignore[assignment]
        params = _trainable(model)
        directions = estimator.sample(params)
        loss, derivatives = estimator.directional_derivatives(model, closure, params, directions)
        local = torch.cat([loss.reshape(1).to(WIRE_DTYPE), derivatives.to(WIRE_DTYPE)])
        total = self.world.all_reduce(
            local, f"the all-reduce of the step's {local.numel()} numbers"
        )
        if not bool(torch.isfinite(total[0])):
            raise NonFiniteLoss(float(total[0]), _SUMMED_LOSS)
        if not bool(torch.isfinite(total[1:]).all()):
            raise NonFiniteLoss(math.inf, "a directional derivative summed over the ranks")
        summed = total[1:].to(device=derivatives.device, dtype=derivatives.dtype)
        _overwrite_grads(params, estimator.combine_estimate(summed, directions))
        return total[0].to(loss.dtype).cpu()

    def _zeroth_order(self, model: nn.Module, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        reduced: list[torch.Tensor] = []

        def global_loss() -> torch.Tensor:
            local = _scalar(closure())
            total = self.world.all_reduce(local.reshape(1), "the all-reduce of a loss value")
            reduced.append(total)
            return total[0].to(device=local.device, dtype=local.dtype)

        try:
            return self.estimator.estimate(model, global_loss)
        except EstimatorError:
            for value in reduced:
                if not bool(torch.isfinite(value).all()):
                    raise NonFiniteLoss(float(value[0]), _SUMMED_LOSS) from None
            raise

    def _backprop(self, model: nn.Module, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self._ddp is None:
            raise ValueError(
                "call prepare(model) before estimate: backprop runs under "
                "DistributedDataParallel, and the closure must call the module prepare returns."
            )
        params = _trainable(model)
        for p in params:
            p.grad = None
        with torch.enable_grad():
            loss = _scalar(closure())
            if loss.grad_fn is None:
                raise ValueError(
                    "the loss does not depend on any trainable parameter; call the module that "
                    "prepare returned in the closure."
                )
            with self.world._collective("DistributedDataParallel's all-reduce of the gradients"):
                loss.backward()
        total = self.world.all_reduce(loss.detach().reshape(1), "the all-reduce of the loss")
        if not bool(torch.isfinite(total).all()):
            raise NonFiniteLoss(float(total[0]), _SUMMED_LOSS)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return total[0].to(loss.dtype).cpu()
