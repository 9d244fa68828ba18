"""Where a process sits in a data-parallel job, and the collectives it needs.

``process_group()`` joins the job that ``torchrun`` (or any ``env://`` launcher) describes and
yields a ``World``: this rank, its shard of each global batch, and the all-reduce, broadcast
and checks that turn a dead or hung rank into a ``RankFailure`` that says so.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from forwardgrad.errors import DistributedError

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_CHECK_EVERY = 200
TIMEOUT_VARIABLE = "FORWARDGRAD_TIMEOUT_S"
# Reduced numbers travel as float64: exact for one rank, and the sum loses nothing to float32.
WIRE_DTYPE = torch.float64
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
    backend, device = _backend_and_device(launch, backend)
    _join(launch, backend, timeout_s, from_environment)
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


def _backend_and_device(launch: Launch, backend: str | None) -> tuple[str, torch.device]:
    """nccl on this rank's GPU when it has one (or when asked), else gloo on the CPU."""
    if backend is None:
        has_gpu = torch.cuda.is_available() and launch.local_rank < torch.cuda.device_count()
        backend = "nccl" if has_gpu and dist.is_nccl_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise DistributedError(f"unknown backend {backend!r}; choose gloo (CPU) or nccl (GPU).")
    if backend == "gloo":
        return backend, torch.device("cpu")
    device = torch.device("cuda", launch.local_rank)
    torch.cuda.set_device(device)
    return backend, device


def _join(launch: Launch, backend: str, timeout_s: float, from_environment: bool) -> None:
    """Rendezvous with the other ranks and start the process group."""
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


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


# --------------------------------------------------------------------------- the estimator


def end_rank(code: int) -> None:
    """End this rank's process now with ``code``, once its files are written and it has left
    the process group: C++ teardown at interpreter exit sometimes aborts a finished gloo rank
    ("terminate called without an active exception", about one job in ten here), which its
    launcher (torchrun, ``torch.multiprocessing``) reports as a failed rank."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
