"""Setting a run up for the loop: the state its steps and callbacks share, built from the config
(and a checkpoint when resuming), and the summary written at the end."""

from __future__ import annotations

import contextlib
import copy
import signal
import statistics
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from forwardgrad.distributed import DataParallel, World, weighted
from forwardgrad.errors import CheckpointError, ConfigurationError, EstimatorError
from forwardgrad.estimators import Estimator
from forwardgrad.experiments import callbacks as cb
from forwardgrad.experiments import checkpoints as ckpt
from forwardgrad.experiments.config import TrainConfig, build_estimator
from forwardgrad.experiments.files import write_json
from forwardgrad.experiments.labels import run_label
from forwardgrad.experiments.memory import PeakMemory
from forwardgrad.experiments.optimizers import make_optimizer, step_size_at
from forwardgrad.experiments.rundir import MetricsLog, NoMetricsLog
from forwardgrad.experiments.schema import (
    METRICS_FILE,
    SUMMARY_FILE,
    Summary,
    finite_or_none,
    metric_columns,
)
from forwardgrad.experiments.tasks import Task, make_task, total_steps
from forwardgrad.seeds import derive_seed


@dataclass
class RunState:
    """What the loop and its callbacks share while a run trains.

    ``forward_model`` is the module the closure calls (DDP's wrapper under data-parallel
    backprop); ``memory`` measures the peak of the training steps alone, paused by ``untimed``.
    """

    config: TrainConfig
    run_dir: Path
    task: Task
    model: nn.Module
    estimator: Estimator
    optimizer: torch.optim.Optimizer
    label: str
    steps: int
    world: World | None = None
    forward_model: nn.Module | None = None
    start: int = 0
    elapsed: float = 0.0
    step_times: list[float] = field(default_factory=list)
    peak_before: int = 0
    expected_bytes: int = 0
    memory: PeakMemory | None = None
    last_loss: float | None = None
    last_eval: tuple[float, float] | None = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes files: always, except ranks other than 0."""
        return self.world is None or self.world.is_main

    @property
    def peak_memory_bytes(self) -> int:
        return max(self.peak_before, self.memory.peak)

    @contextlib.contextmanager
    def untimed(self) -> Iterator[None]:
        """Work whose memory does not count (evaluation, gaps, checkpoints)."""
        self.memory.pause()
        try:
            yield
        finally:
            self.memory.resume()

    def step_size(self, step: int) -> float:
        return step_size_at(self.config, step)

    def row(self, step: int) -> dict[str, Any]:
        """The start of ``step``'s metrics row: what is known before the update."""
        values = {"step": step, "time_s": self.elapsed, "lr": self.step_size(step)}
        return {**values, **self.task.position(self.model)}

    def closure(self, batch: Any) -> Callable[[], torch.Tensor]:
        """The loss of ``batch``; on a rank, its share w_r·L_r of the global batch's mean loss."""
        if self.world is None:
            return self.task.closure(self.model, batch)
        shard, weight = self.world.shard(batch)
        return weighted(self.task.closure(self.forward_model, shard), weight)


def start_run(
    config: TrainConfig,
    run_dir: Path,
    loaded: ckpt.LoadedCheckpoint | None,
    download: bool,
    world: World | None,
) -> RunState:
    """The run's task, model, estimator and optimizer, restored from ``loaded`` if given."""
    with main_first(world, "loading the data"):
        task = make_task(config, download)
    torch.manual_seed(config.seed)
    model = task.make_model(config)
    run = RunState(
        config=config,
        run_dir=run_dir,
        task=task,
        model=model,
        estimator=build_estimator(config, seed=derive_seed(config.seed, "tangents")),
        optimizer=make_optimizer(config, model),
        label=run_label(config),
        steps=total_steps(config, task),
        world=world,
        forward_model=model,
    )
    if loaded is not None:
        _restore(run, loaded)
    if world is not None:
        world.check_parameters(model, run.start)  # same initialisation, or same checkpoint
        run.estimator = DataParallel(run.estimator, world)
        run.forward_model = run.estimator.prepare(model)
        run.expected_bytes = run.estimator.bytes_per_step(model)
    if run.start > run.steps:
        raise ConfigurationError(
            f"{run_dir} was checkpointed at step {run.start}, beyond the {run.steps} steps "
            "asked for; ask for at least that many."
        )
    _warm_up(run)
    run.memory = PeakMemory()
    return run


# What every checkpoint of a run holds (``callbacks.Checkpoints.save`` writes them).
CHECKPOINT_KEYS = (
    "step", "elapsed_s", "step_times_s", "peak_memory_bytes", "model", "optimizer", "estimator",
    "data", "rng",
)  # fmt: skip


def _restore(run: RunState, loaded: ckpt.LoadedCheckpoint) -> None:
    state = loaded.state
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            f"{loaded.path} lacks {', '.join(missing)}; it is not a checkpoint of a forwardgrad "
            "run. Delete it (or the run directory) to start over."
        )
    try:
        run.start, run.elapsed = int(state["step"]), float(state["elapsed_s"])
        if run.start < 0:
            raise ValueError(f"step {run.start} is negative")
        run.step_times = [float(value) for value in state["step_times_s"]]
        run.peak_before = int(state["peak_memory_bytes"])
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.estimator.load_state_dict(state["estimator"])
        run.task.load_state_dict(state["data"])
        ckpt.restore_rng_state(state["rng"])
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(
            f"{loaded.path} does not fit this run's model, optimizer or state ({reason})."
        ) from None


def _warm_up(run: RunState) -> None:
    """One throwaway estimate on a copy of the model, with every random state put back after.

    The first estimate in a process pays one-time costs (lazy imports, kernel selection, the
    allocator's first pools), tens of MB for forward-mode AD; without this they would count as
    the time and peak memory of the first training step.
    """
    estimator_state = copy.deepcopy(run.estimator.state_dict())
    data_state = copy.deepcopy(run.task.state_dict())
    rng_state = ckpt.capture_rng_state()
    scratch = copy.deepcopy(run.model)
    try:
        run.estimator.estimate(scratch, run.task.closure(scratch, run.task.next_batch()))
    except EstimatorError:
        pass  # the real first step meets the same problem and reports it
    finally:
        run.estimator.load_state_dict(estimator_state)
        run.task.load_state_dict(data_state)
        ckpt.restore_rng_state(rng_state)


def build_callbacks(
    run: RunState,
    progress: Callable[[cb.Progress], None] | None,
    signals: list[int],
    checkpoints: cb.Checkpoints,
) -> list[cb.Callback]:
    """The callbacks of a run, in the order they act on each step."""
    config = run.config
    callbacks: list[cb.Callback] = []
    if not config.is_frank_wolfe:  # Frank-Wolfe keeps its own schedule (set in its groups)
        callbacks.append(cb.LearningRateSchedule())
    if not config.is_test_function:
        callbacks.append(cb.Evaluation(config.eval_every))
    if config.is_frank_wolfe:
        callbacks.append(cb.FrankWolfeGaps(config.log_every, config.is_test_function))
    columns = metric_columns(config.is_test_function, config.is_frank_wolfe)
    log = (
        MetricsLog(run.run_dir / METRICS_FILE, columns, keep_before=run.start)
        if run.is_main
        else NoMetricsLog()
    )
    callbacks.append(cb.MetricsLogger(log, config.log_every))
    if run.world is not None:
        callbacks.append(cb.RankCheck())
    callbacks.append(checkpoints)
    if progress is not None:
        callbacks.append(cb.ProgressReport(progress))
    callbacks.append(cb.SignalStop(signals))
    return callbacks


def write_summary(run: RunState, steps: int, final: cb.StepRecord | None) -> dict[str, Any]:
    """Write ``summary.json`` (rank 0) after the run ended at ``steps``; ``final`` is the final
    row, None when the run diverged. Returns what was written."""
    if final is None:  # a finished run paused the measurement before its final row
        run.memory.pause()
    config, position = run.config, run.task.position(run.model) if final else {}
    test_loss, test_accuracy = run.last_eval if run.last_eval else (None, None)
    final_values = final.values if final else {}
    summary = Summary(
        problem=config.problem,
        dataset=config.dataset,
        estimator=config.estimator,
        tangent_rank=config.tangent_rank,
        local_losses=config.local_losses,
        guess=config.guess,
        label=run.label,
        steps=steps,
        final_train_loss=finite_or_none(final_values.get("train_loss")),
        final_test_loss=finite_or_none(test_loss),
        final_test_accuracy=test_accuracy,
        median_step_time_s=statistics.median(run.step_times) if run.step_times else None,
        peak_memory_bytes=run.peak_memory_bytes,
        peak_memory_method=run.memory.method,
        lr=config.lr,
        lr_selected_by=config.lr_selected_by,
        world_size=config.world_size,
        diverged=final is None,
        final_distance_to_optimum=finite_or_none(position.get("distance_to_optimum")),
        # Measured in the last step (config.json holds the count expected from the model).
        bytes_communicated_per_step=_bytes_sent(run, final is None),
    )
    if config.is_frank_wolfe and final is not None:
        summary.final_fw_gap = finite_or_none(run.optimizer.last_gap)
        summary.final_fw_gap_exact = finite_or_none(final_values.get("fw_gap_exact"))
    values = summary.to_json(frank_wolfe=config.is_frank_wolfe and final is not None)
    if run.is_main:
        write_json(run.run_dir / SUMMARY_FILE, values)
    return values


def _bytes_sent(run: RunState, diverged: bool) -> int:
    if run.world is None:
        return 0
    return run.expected_bytes if diverged else run.estimator.bytes_last_step


def main_first(world: World | None, what: str) -> contextlib.AbstractContextManager:
    """Rank 0 does ``what`` before the other ranks (one process: just do it)."""
    return world.main_first(what) if world is not None else contextlib.nullcontext()


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run with ``threads`` torch CPU threads (None: torch's default); yields the count."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def raise_for_signal(signum: int, frame=None) -> None:
    """A signal handler: KeyboardInterrupt for SIGINT, ``callbacks.Terminated`` for SIGTERM."""
    raise cb.Terminated if signum == signal.SIGTERM else KeyboardInterrupt


@contextlib.contextmanager
def deferred_signals() -> Iterator[list[int]]:
    """SIGINT and SIGTERM only set a flag, so the loop stops between steps, after a checkpoint.

    A second signal stops at once (KeyboardInterrupt, or ``callbacks.Terminated`` for SIGTERM),
    for a user who does not want to wait. Outside the main thread signals cannot be caught; the
    flag then never rises.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if received:
            raise_for_signal(signum)
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
