"""The whole benchmark: what to measure (``BenchConfig``), the machine it ran on, and the run."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import torch

from forwardgrad.bench.contenders import (
    ACTIVITY,
    ACTIVITY_LOCAL,
    BACKPROP,
    BACKPROP_KEPT,
    FORWARD,
    LOCAL_BACKPROP,
    LOCAL_GUESS,
    ZEROTH_ORDER,
    Contender,
    forward_gradient,
    forward_gradient_local,
    forward_sgd,
    kept,
)
from forwardgrad.bench.memory import memory_table
from forwardgrad.bench.timing import sampling_throughput, time_steps
from forwardgrad.experiments.problems import PROBLEMS
from forwardgrad.tangents import DISTRIBUTIONS
from forwardgrad.tangents import STREAMABLE as PER_PARAMETER_DISTRIBUTIONS

# The parts of the benchmark, which --skip names; "local" is the local-learning contenders
# (activity perturbation, local losses, local guesses, local backprop) in timing and memory.
PARTS = ("timing", "sampling", "memory", "local")


def bench_models() -> tuple[str, ...]:
    """The paper's models, from the problem registry (the test functions have no batch)."""
    return tuple(name for name, problem in PROBLEMS.items() if not problem.is_test_function)


def bench_distributions() -> tuple[str, ...]:
    """The tangent distributions of the registry that every contender can draw: ForwardSGD
    draws each parameter's tangent on its own, which rules out the orthogonal one."""
    return tuple(name for name in DISTRIBUTIONS if name in PER_PARAMETER_DISTRIBUTIONS)


@dataclass
class BenchConfig:
    """What ``run_benchmark`` measures; ``quick()`` is a smoke test of a minute or two."""

    models: tuple[str, ...] = field(default_factory=bench_models)
    batches: tuple[int, ...] = (64, 1024)
    tangents: tuple[int, ...] = (1, 4, 16)
    distributions: tuple[str, ...] = field(default_factory=bench_distributions)
    rounds: int = 20
    warmup: int = 2
    budget_s: float = 300.0  # per (model, batch); fewer rounds (>= 3) past it, reported
    sampling_size: int = 1_863_690
    memory_depths: tuple[int, ...] = (4, 8, 16)
    memory_batch: int = 1024
    memory_width: int = 1024
    memory_cnn: bool = True
    threads: int | None = None
    # Ranks of structured tangents: each adds forward-gradient (every K and distribution) and
    # ForwardSGD contenders beside the dense ones.
    ranks: tuple[int, ...] = ()
    skip: tuple[str, ...] = field(default_factory=tuple)  # of PARTS

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(
            models=("logreg", "mlp"),
            batches=(64,),
            tangents=(1, 4),
            rounds=5,
            warmup=1,
            budget_s=20.0,
            sampling_size=1 << 20,
            memory_depths=(2, 4),
            memory_batch=256,
            memory_cnn=False,
        )

    def timing_contenders(self) -> list[Contender]:
        contenders = [BACKPROP, FORWARD]
        for rank in (None, *self.ranks):
            for k in self.tangents:
                contenders += [forward_gradient(k, d, rank) for d in self.distributions]
        contenders += [forward_sgd(self.distributions[0], rank) for rank in (None, *self.ranks)]
        return [*contenders, ZEROTH_ORDER, *self.local_contenders()]

    def local_contenders(self) -> list[Contender]:
        """The local-learning contenders (each measured on the problems it applies to)."""
        if "local" in self.skip:
            return []
        local = forward_gradient_local(self.distributions[0])
        return [ACTIVITY, ACTIVITY_LOCAL, local, LOCAL_GUESS, LOCAL_BACKPROP]

    def memory_contenders(self) -> list[Contender]:
        distribution = self.distributions[0]
        estimate = forward_gradient(1, distribution)
        fresh = [BACKPROP, FORWARD, estimate, forward_sgd(distribution)]
        fresh += [forward_sgd(distribution, rank) for rank in self.ranks]
        fresh += [c for c in self.local_contenders() if c is not ACTIVITY_LOCAL]
        return [*fresh, BACKPROP_KEPT, kept(estimate)]


def machine() -> dict:
    """What produced the numbers: CPU, cores, threads, torch, and the load at the time."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            names = [
                line.split(":", 1)[1].strip() for line in info if line.startswith("model name")
            ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def run_benchmark(config: BenchConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Run every part of ``config`` that is not skipped; returns the JSON-ready results."""
    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    results: dict = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": asdict(config),
        "timing": [],
        "sampling": [],
        "memory": [],
    }
    try:
        if "timing" not in config.skip:
            for model_name in config.models:
                for batch in config.batches:
                    if progress:
                        progress(f"timing: {model_name} batch {batch}")
                    results["timing"] += time_steps(
                        model_name,
                        batch,
                        config.timing_contenders(),
                        config.rounds,
                        config.warmup,
                        config.budget_s,
                    )
        if "sampling" not in config.skip:
            if progress:
                progress("sampling throughput")
            results["sampling"] = sampling_throughput(
                config.sampling_size, config.rounds, config.warmup
            )
        if "memory" not in config.skip:
            problems = [("deep-mlp", d, config.memory_batch) for d in config.memory_depths]
            if config.memory_cnn:
                problems.append(("cnn", None, config.memory_batch))
            results["memory"] = memory_table(
                problems, config.memory_contenders(), config.threads, progress
            )
    finally:
        torch.set_num_threads(threads_before)
    results["duration_s"] = time.perf_counter() - started
    results["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return results
