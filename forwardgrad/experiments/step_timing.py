"""Step times of compared runs, fair under load by construction.

Runs trained one after another meet different loads: a ratio of their step times measures the
machine as much as the estimators. So after the runs, one process rebuilds every run's model,
estimator and optimizer on one mini-batch of its problem and alternates single steps of each (the
benchmark's ``alternate``: the order rotated every round), recording the wall and CPU time of each
step. Each round's ratio to the backprop step of the same round sees the same load; the report
gives their median and 10th-90th percentiles. The CPU time of the stepping thread says whether
the machine was loaded: a step that got the core throughout has CPU time equal to wall time.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from forwardgrad.experiments.config import TrainConfig, build_estimator, load_config
from forwardgrad.experiments.labels import run_label
from forwardgrad.experiments.optimizers import make_optimizer
from forwardgrad.experiments.runstate import torch_threads
from forwardgrad.experiments.tasks import Task, make_task
from forwardgrad.seeds import derive_seed

STEP_TIMING_FILE = "step_timing.json"
# A step whose thread had the core for less than this share of its wall time was slowed by other
# processes: the machine is reported as loaded.
LOADED_CPU_SHARE = 0.8
# Per-round ratios whose 10th-90th percentile band is wider than this share of the median are
# reported as noisy.
NOISY_SPREAD = 0.5
ROUNDS, WARMUP, BUDGET_S = 40, 3, 30.0


def _build_step(run_dir: Path, download: bool) -> tuple[TrainConfig, Callable[[], None]]:
    """A run's config and one training step on a fixed mini-batch of its problem."""
    config = load_config(run_dir)
    task = make_task(config, download)
    torch.manual_seed(config.seed)
    model = task.make_model(config)
    return config, make_step(config, task, model)


def make_step(config: TrainConfig, task: Task, model: nn.Module) -> Callable[[], None]:
    """One training step of ``config``'s estimator and optimizer on ``model``, on one fixed
    mini-batch of ``task``."""
    estimator = build_estimator(config, seed=derive_seed(config.seed, "tangents"))
    optimizer = make_optimizer(config, model)
    closure = task.closure(model, task.next_batch())

    def step() -> None:
        estimator.estimate(model, closure)
        optimizer.step()

    return step


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    p10, median, p90 = np.quantile(np.asarray(values, dtype=float), [0.1, 0.5, 0.9])
    return {"median": float(median), "p10": float(p10), "p90": float(p90)}


def time_runs(
    run_dirs: Sequence[str | os.PathLike],
    *,
    rounds: int = ROUNDS,
    warmup: int = WARMUP,
    budget_s: float | None = BUDGET_S,
    download: bool = True,
) -> dict[str, Any]:
    """Alternate single steps of every run (see the module docstring); what
    ``step_timing.json`` holds: per run, wall and CPU time per step and, for every backprop run
    among them, the per-round ratios to its step.

    Args:
        run_dirs: finished run directories of one problem, with the same thread count.
        rounds, warmup, budget_s: as ``forwardgrad.bench.timing.alternate`` takes them.
        download: whether a missing data set may be downloaded.
    """
    from forwardgrad.bench.timing import alternate  # the bench package imports the CLI's flags

    built = {Path(d).name: _build_step(Path(d), download) for d in run_dirs}
    references = [k for k, (config, _) in built.items() if config.estimator == "backprop"]
    cpu: dict[str, list[float]] = {}
    with torch_threads(next(iter(built.values()))[0].threads) as threads:
        steps = {key: step for key, (_, step) in built.items()}
        wall = alternate(steps, rounds, warmup, budget_s, cpu=cpu)
    shares = [c / w for k in wall for c, w in zip(cpu[k], wall[k]) if w > 0]
    runs = {}
    for key, (config, _) in built.items():
        runs[key] = {
            "label": run_label(config),
            "wall_s": _quantiles(wall[key]),
            "cpu_s": _quantiles(cpu[key]),
            "ratio_to": {ref: _ratios(wall, cpu, key, ref) for ref in references},
        }
    return {
        "method": "single steps of every run alternated in one process, order rotated each round",
        "threads": threads,
        "rounds": len(next(iter(wall.values()))),
        "cpu_share": statistics.median(shares) if shares else 1.0,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": runs,
    }


def _ratios(wall: dict, cpu: dict, key: str, ref: str) -> dict[str, float]:
    """Wall-time ratios of ``key``'s step to ``ref``'s of the same round (median, 10th and 90th
    percentiles) and the ratio of their median CPU times."""
    per_round = [a / b for a, b in zip(wall[key], wall[ref]) if b > 0]
    cpu_ratio = statistics.median(cpu[key]) / max(statistics.median(cpu[ref]), 1e-12)
    return {**_quantiles(per_round), "cpu": cpu_ratio}


def is_loaded(timing: dict[str, Any]) -> bool:
    """Whether other processes took the core while the steps were timed."""
    return float(timing.get("cpu_share", 1.0)) < LOADED_CPU_SHARE


def is_noisy(ratio: dict[str, float]) -> bool:
    """Whether per-round ratios spread widely (10th-90th band over half the median)."""
    return ratio["median"] > 0 and (ratio["p90"] - ratio["p10"]) / ratio["median"] > NOISY_SPREAD
