"""Timing: contenders alternated round by round (their order rotated each round), warm-up
rounds first, then the median of the timed rounds; tangent sampling against torch's samplers."""

from __future__ import annotations

import copy
import gc
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from forwardgrad import tangents as tg
from forwardgrad.bench.contenders import BACKPROP, Contender, make_problem, make_step


def alternate(
    steps: dict[str, Callable[[], None]],
    rounds: int,
    warmup: int = 2,
    budget_s: float | None = None,
    min_rounds: int = 3,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Time each callable once per round, in an order rotated every round; returns seconds.

    ``warmup`` rounds are run and discarded first. With ``budget_s``, timing stops after the
    round that exceeds it, once ``min_rounds`` rounds have been timed. With ``cpu``, the CPU
    time of the calling thread during each timed step is appended to ``cpu[name]``: below the
    wall time when other processes took the core.
    """
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for index in range(warmup + rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            begin, begin_cpu = time.perf_counter(), time.thread_time()
            steps[name]()
            elapsed = time.perf_counter() - begin
            if index >= warmup:
                times[name].append(elapsed)
                if cpu is not None:
                    cpu.setdefault(name, []).append(time.thread_time() - begin_cpu)
        timed = index + 1 - warmup
        over = budget_s is not None and time.perf_counter() - started > budget_s
        if timed >= min_rounds and over:
            break
    return times


def time_steps(
    model_name: str,
    batch: int,
    contenders: Sequence[Contender],
    rounds: int = 20,
    warmup: int = 2,
    budget_s: float | None = None,
) -> list[dict]:
    """Median step time of each contender that applies to the problem, and its ratio to
    backprop's.

    Every contender trains its own copy of the model on the same batch.
    """
    if BACKPROP not in contenders:
        contenders = [BACKPROP, *contenders]
    contenders = [c for c in contenders if c.applies_to(model_name)]
    model, images, labels = make_problem(model_name, batch)
    steps = {
        c.key: make_step(c, copy.deepcopy(model), images, labels, seed=i, problem=model_name)
        for i, c in enumerate(contenders)
    }
    gc.collect()
    times = alternate(steps, rounds, warmup, budget_s)
    reference = statistics.median(times[BACKPROP.key])
    rows = []
    for c in contenders:
        median = statistics.median(times[c.key])
        rows.append(
            {
                "model": model_name,
                "batch": batch,
                "contender": c.key,
                "label": c.label,
                "steps": len(times[c.key]),
                "median_ms": 1e3 * median,
                "ratio_to_backprop": median / reference,
            }
        )
    return rows


def sampling_throughput(size: int = 1_863_690, rounds: int = 20, warmup: int = 2) -> list[dict]:
    """Values per second of this package's samplers and of torch's, into one buffer of ``size``.

    ``size`` defaults to the parameter count of the paper's MLP. The Rademacher baselines are
    the usual ways of drawing signs with torch: ``bernoulli_`` and ``randint``.
    """
    buffer = torch.empty(size)
    generator = torch.Generator().manual_seed(0)
    seeds = iter(range(10**9))
    methods: dict[str, Callable[[], None]] = {
        "forwardgrad normal": lambda: tg.fill_tangent(buffer, "normal", next(seeds), 0, 0),
        "torch normal_": lambda: buffer.normal_(generator=generator),
        "forwardgrad rademacher": lambda: tg.fill_tangent(buffer, "rademacher", next(seeds), 0, 0),
        "torch bernoulli_ signs": lambda: (
            buffer.bernoulli_(0.5, generator=generator).mul_(2).sub_(1)
        ),
        "torch randint signs": lambda: buffer.copy_(
            torch.randint(0, 2, (size,), generator=generator).mul_(2).sub_(1)
        ),
    }
    times = alternate(methods, rounds, warmup)
    rows = []
    for name, seconds in times.items():
        median = statistics.median(seconds)
        rows.append(
            {
                "method": name,
                "values": size,
                "median_ms": 1e3 * median,
                "values_per_s": size / median,
            }
        )
    return rows
