"""Upper bounds on a run's settings: an absurd value is refused in one sentence that names the
setting, before it can crash the process (100,000 threads), exhaust its memory (a billion
tangents) or overflow a 64-bit integer (a 20-digit seed)."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from forwardgrad.errors import ConfigurationError
from forwardgrad.experiments.datasets import DATASETS, IMAGE_SIZE
from forwardgrad.tangents.structured import is_structured, matrix_shape

if TYPE_CHECKING:
    from forwardgrad.experiments.config import TrainConfig

MAX_SEED = 2**63 - 1  # seeds are stored and hashed as signed 64-bit integers
MAX_STEPS = 10**12  # over 11 days at a microsecond a step
# More threads than cores only slow torch down, and OpenMP crashes creating 100,000; the bound is
# not this machine's core count so that a run stays resumable on a smaller machine.
MAX_THREADS = 1024
BYTES_PER_NUMBER = 4  # float32 parameters and tangents
_PERTURBED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # the layers activity perturbation uses


def check_limits(config: TrainConfig) -> None:
    """Refuse a seed, step count, thread count or batch size beyond what a run can use."""
    if config.seed > MAX_SEED:
        raise ConfigurationError(
            f"seed must be at most {MAX_SEED} (it has to fit in 64 bits), got {config.seed}."
        )
    if config.threads is not None and config.threads > MAX_THREADS:
        raise ConfigurationError(
            f"threads must be at most {MAX_THREADS} (this machine has {os.cpu_count()} CPUs; "
            f"more threads than CPUs only slow torch down), got {config.threads}."
        )
    train_size = None
    if not config.is_test_function:
        train_size = math.floor(
            DATASETS[config.dataset].train_size * (1 - config.validation_fraction)
        )
        if config.batch_size > train_size:
            raise ConfigurationError(
                f"batch_size {config.batch_size} is larger than the {train_size:,} training "
                f"examples of {config.dataset}; choose at most {train_size}."
            )
    steps = config.steps
    if steps is None and train_size:
        steps = config.epochs * math.ceil(train_size / config.batch_size)
    if steps is not None and steps > MAX_STEPS:
        given = f"steps {config.steps:,}" if config.steps else f"epochs {config.epochs:g}"
        raise ConfigurationError(
            f"{given} asks for {steps:.3g} steps, more than the {MAX_STEPS:,} a run may take "
            "(it would never end); ask for fewer."
        )


def check_tangent_memory(config: TrainConfig, model: nn.Module) -> None:
    """Refuse ``tangents`` whose K copies of the parameters cannot fit in the memory available.

    A forward-gradient or zeroth-order step holds its K tangents at once, each the size of the
    parameters (with ``tangent_rank`` r, a matrix's tangent is its r·(m + n) factors), or for
    activity perturbation the size of the perturbed layers' outputs for the whole batch: that
    alone is a lower bound on what the step needs. Local guesses take their directions from
    local losses, not from K tangents, so they are not bounded here.
    """
    if config.guess is not None:
        return
    parameters = sum(p.numel() for p in model.parameters())
    if config.estimator == "backprop":
        per_tangent, copies = 0, 3  # parameters, gradient, optimizer state
    elif config.estimator == "activity":
        per_tangent, copies = config.batch_size * _activation_numbers(model), 2
    else:
        per_tangent, copies = _tangent_numbers(model, config.tangent_rank), 2
    needed = (config.tangents * per_tangent + copies * parameters) * BYTES_PER_NUMBER
    available = available_memory_bytes()
    if available is None or needed <= available:
        return
    if config.estimator == "backprop":
        raise ConfigurationError(
            f"the model's {parameters:,} parameters need about {needed / 2**30:.3g} GiB, more "
            f"than the {available / 2**30:.3g} GiB of memory available; choose a smaller problem."
        )
    fit = max(0, (available // BYTES_PER_NUMBER - copies * parameters) // per_tangent)
    raise ConfigurationError(
        f"tangents {config.tangents} needs about {needed / 2**30:.3g} GiB ({config.tangents:,} "
        f"tangents of {per_tangent:,} numbers each, for the model's {parameters:,} parameters), "
        f"more than the {available / 2**30:.3g} GiB of memory available; choose at most "
        f"{fit:,} tangents."
    )


def _activation_numbers(model: nn.Module) -> int:
    """Outputs of the layers activity perturbation perturbs, for one example (the model on the
    meta device, run on a meta image: shapes only)."""
    layers = [m for m in model.modules() if isinstance(m, _PERTURBED) and list(m.parameters())]
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, out: sizes.append(out.numel())) for m in layers]
    try:
        model(torch.empty(1, 1, IMAGE_SIZE, IMAGE_SIZE, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return sum(sizes)


def _tangent_numbers(model: nn.Module, rank: int | None) -> int:
    """Numbers one tangent holds: every parameter's, or a structured matrix's r·(m + n)."""
    total = 0
    for p in model.parameters():
        rows, columns = matrix_shape(p)
        total += rank * (rows + columns) if is_structured(p, rank) else p.numel()
    return total


def available_memory_bytes() -> int | None:
    """Memory the system can give this process now (Linux MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
