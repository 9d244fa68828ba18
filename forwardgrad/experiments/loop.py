"""Training: one plain loop for every estimator, problem and optimizer, resumable bit for bit.

Each step draws a mini-batch, lets the estimator fill ``.grad`` (forward gradient, zeroth-order
or backprop) and lets a ``torch.optim`` optimizer apply it, with the paper's learning rate

    η_i = η₀ · exp(−i · k)        (i = 0, 1, ... the step; η₀ = 2e-4, k = 1e-4 by default).

A run directory receives ``config.json`` (all that reruns it), ``metrics.csv`` (one row per
logged step, see ``schema``), ``summary.json`` and ``checkpoints/``. Evaluation, logging and
checkpointing happen in callbacks (``callbacks``) and are not timed.

With ``optimizer="frank-wolfe"`` (``forwardgrad.FrankWolfe``, every parameter kept in
``constraint``) the step size is Frank-Wolfe's own γ_t = 2/(t+2) (or a constant ``lr``), the ``lr``
column logs γ_t, and ``metrics.csv`` adds the gap of each update and the gap with the exact
gradient at evaluation rows, the measure of how far the iterate is from the constrained optimum.

``train(config, run_dir, resume=True)`` continues from the newest intact checkpoint, which holds
the model, the optimizer, the estimator's generator, the data order and every global RNG, so a
resumed run ends with exactly the parameters of an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import signal
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from forwardgrad.distributed import World
from forwardgrad.errors import ForwardGradError, NonFiniteLoss
from forwardgrad.estimators import Estimator
from forwardgrad.experiments import checkpoints as ckpt
from forwardgrad.experiments.callbacks import (
    Callback,
    Checkpoints,
    Progress,
    StepRecord,
    StopRequested,
)
from forwardgrad.experiments.config import TrainConfig
from forwardgrad.experiments.rundir import prepare_run_dir, write_config
from forwardgrad.experiments.runstate import (
    RunState,
    build_callbacks,
    deferred_signals,
    main_first,
    start_run,
    torch_threads,
    write_summary,
)
from forwardgrad.experiments.schema import CHECKPOINT_DIR


class TrainingDiverged(ForwardGradError, RuntimeError):
    """The loss became NaN or infinite; the run stopped and its last good checkpoint was kept.

    Attributes:
        step: the step whose loss (or derivative) was not finite.
        loss: that value. checkpoint: the checkpoint kept, or None.
    """

    def __init__(self, message: str, step: int, loss: float, checkpoint: Path | None):
        super().__init__(message)
        self.step, self.loss, self.checkpoint = step, loss, checkpoint


class TrainingInterrupted(Exception):
    """SIGINT, SIGTERM or KeyboardInterrupt stopped the run between two steps, after a checkpoint.

    Attributes:
        step: updates applied, and saved in ``checkpoint``.
        signal_number: ``signal.SIGINT`` or ``signal.SIGTERM``; SIGINT for a KeyboardInterrupt.
        checkpoint: the checkpoint written on the way out; None if there is nothing to resume
            (the parameters were not finite, or the run was a learning-rate sweep's).
        run_dir: the run directory, to pass to ``train(..., resume=True)``; None with no
            checkpoint.
    """

    def __init__(
        self, step: int, signal_number: int, checkpoint: Path | None, run_dir: Path | None
    ):
        name = signal.Signals(signal_number).name
        saved = f"saved {checkpoint}" if checkpoint else "wrote no checkpoint"
        super().__init__(f"{name} received; stopped after step {step} and {saved}.")
        self.step, self.signal_number = step, signal_number
        self.checkpoint, self.run_dir = checkpoint, run_dir


class CheckpointWarning(UserWarning):
    """A corrupt checkpoint was skipped, or a resume found no checkpoint and started over."""


@dataclass
class TrainResult:
    """The outcome of ``train``: the run directory, its summary and where it resumed from."""

    run_dir: Path
    summary: dict[str, Any]
    resumed_from: ckpt.LoadedCheckpoint | None = None


def train(
    config: TrainConfig,
    run_dir: str | os.PathLike,
    progress: Callable[[Progress], None] | None = None,
    *,
    resume: bool = False,
    download: bool = True,
    command: Sequence[str] | None = None,
    world: World | None = None,
) -> TrainResult:
    """Train one estimator on one problem and write the run directory.

    Args:
        config: the run's settings (validated here).
        run_dir: where config.json, metrics.csv, summary.json and checkpoints/ go. Must be new or
            empty, unless ``resume``.
        progress: called with a ``Progress`` after every step; a KeyboardInterrupt raised by it
            stops the run like SIGINT (after a checkpoint).
        resume: continue the run in ``run_dir`` from its newest intact checkpoint (from step 0
            if it has none). Metrics rows from that step on are replaced.
        download: whether a missing data set may be downloaded.
        command: the command line that started the run, recorded in config.json.
        world: this rank of a distributed job (``forwardgrad.distributed.process_group``), or
            None for one process. Every rank trains on its shard of the same global batches
            and reaches the parameters one process would; only rank 0 writes to ``run_dir``.

    Returns:
        A ``TrainResult`` with the summary written to summary.json.

    Raises:
        TrainingDiverged: the loss became NaN or infinite (summary.json records it).
        TrainingInterrupted: SIGINT/SIGTERM/KeyboardInterrupt; a checkpoint was written first.
        ConfigurationError, DataError, CheckpointError: bad settings, data or run directory.
    """
    config = replace(config).validate()
    if world is not None:
        config.world_size = world.world_size
    run_dir = Path(run_dir)
    is_main = world is None or world.is_main  # the one process that writes files
    with main_first(world, "preparing the run directory"):
        if is_main or resume:
            prepare_run_dir(run_dir, resume)
    loaded = _load_checkpoint(run_dir / CHECKPOINT_DIR, resume, is_main)
    with torch_threads(config.threads) as threads:
        config.threads = threads
        run = start_run(config, run_dir, loaded, download, world)
        if is_main:
            write_config(run_dir, config, run.steps, command, run.expected_bytes, resume)
        checkpoints = Checkpoints(run_dir / CHECKPOINT_DIR, config.checkpoint_every, loaded)
        final = _steps_with_callbacks(run, progress, checkpoints)
    summary = write_summary(run, run.steps, final)
    return TrainResult(run_dir=run_dir, summary=summary, resumed_from=loaded)


def _steps_with_callbacks(
    run: RunState, progress: Callable[[Progress], None] | None, checkpoints: Checkpoints
) -> StepRecord:
    """``run_steps`` between the callbacks; a diverged run's summary is written before raising."""
    # Signals are deferred from the first step on, to stop after a checkpoint; before, there
    # is nothing to save and a blocking read or download must stop at once.
    with deferred_signals() as signals:
        callbacks = build_callbacks(run, progress, signals, checkpoints)
        try:
            return run_steps(run, callbacks, checkpoints)
        except TrainingDiverged as error:
            write_summary(run, error.step, None)
            raise
        finally:
            for callback in callbacks:
                callback.close()


def _load_checkpoint(directory: Path, resume: bool, is_main: bool):
    """The newest intact checkpoint when resuming (warning about the ones skipped), else None."""
    loaded = ckpt.load_latest_checkpoint(directory) if resume else None
    for path, reason in loaded.skipped if loaded and is_main else []:
        warnings.warn(f"skipped {path.name}: {reason}", CheckpointWarning, stacklevel=3)
    if resume and loaded is None and is_main:
        warnings.warn(
            f"{directory} holds no checkpoint; the run starts again from step 0.",
            CheckpointWarning,
            stacklevel=3,
        )
    return loaded


def run_steps(run: RunState, callbacks: Sequence[Callback], checkpoints: Checkpoints) -> StepRecord:
    """The loop: every step from ``run.start`` to ``run.steps`` between the callbacks' hooks;
    returns the final row (the final parameters' loss and evaluation). ``checkpoints`` (one of
    the callbacks) also saves the state when a callback stops the run."""
    for callback in callbacks:
        callback.on_start(run)
    run.memory.resume()
    for step in range(run.start, run.steps):
        record = StepRecord(step, run.row(step))
        for callback in callbacks:
            callback.before_step(run, record)
        _take_step(run, record, callbacks, checkpoints)
        try:
            for callback in callbacks:
                callback.after_step(run, record)
        except StopRequested as stop:
            run.memory.pause()
            saved = checkpoints.save(run, record.done)
            raise TrainingInterrupted(record.done, stop.signal_number, saved, run.run_dir) from None
    run.memory.pause()
    try:
        return _final_row(run, callbacks)
    except StopRequested as stop:  # during the final checkpoint or evaluation
        raise TrainingInterrupted(
            run.steps, stop.signal_number, checkpoints.newest, run.run_dir
        ) from None


def _final_row(run: RunState, callbacks: Sequence[Callback]) -> StepRecord:
    """The end of training (the final checkpoint), then the final row, which describes θ_steps:
    a fresh mini-batch's loss and a last evaluation."""
    for callback in callbacks:
        callback.on_train_end(run)
    record = StepRecord(run.steps, run.row(run.steps))
    record.values["train_loss"] = run.task.train_loss(run.model, run.task.next_batch())
    for callback in callbacks:
        callback.on_final_row(run, record)
    return record


def _take_step(
    run: RunState, record: StepRecord, callbacks: Sequence[Callback], checkpoints: Checkpoints
) -> None:
    """One timed update; a non-finite loss ends the run with ``TrainingDiverged``. The
    callbacks' ``after_estimate`` runs between the estimate and the optimizer step, untimed."""
    started, untimed = time.perf_counter(), 0.0
    batch = run.task.next_batch()
    closure = run.closure(batch)

    def after_estimate() -> None:
        nonlocal untimed
        began = time.perf_counter()
        for callback in callbacks:
            callback.after_estimate(run, record, batch)
        untimed += time.perf_counter() - began

    try:
        run.last_loss = train_step(
            run.model, run.estimator, run.optimizer, closure, after_estimate=after_estimate
        )
    except NonFiniteLoss as error:
        record.values["train_loss"] = error.value
        for callback in callbacks:
            callback.on_diverged(run, record)
        kept = checkpoints.last_good(record.step) if run.is_main else None
        raise _diverged(run.config, record, error, kept) from None
    step_time = time.perf_counter() - started - untimed
    record.values["train_loss"] = run.last_loss
    run.elapsed += step_time
    run.step_times.append(step_time)


def train_step(
    model: torch.nn.Module,
    estimator: Estimator,
    optimizer: torch.optim.Optimizer,
    closure: Callable[[], torch.Tensor],
    *,
    after_estimate: Callable[[], None] | None = None,
) -> float:
    """Estimate the gradient into ``.grad``, call ``after_estimate`` (if given), apply the
    optimizer, return the loss before the step.

    Raises:
        NonFiniteLoss: the loss (or a directional derivative) is NaN or infinite; the
            parameters were left as they were.
    """
    loss = float(estimator.estimate(model, closure))
    if not math.isfinite(loss):
        raise NonFiniteLoss(loss, "the loss")
    if after_estimate is not None:
        after_estimate()
    optimizer.step()
    return loss


def _diverged(
    config: TrainConfig, record: StepRecord, error: NonFiniteLoss, checkpoint: Path | None
) -> TrainingDiverged:
    kept = (
        f"its last good checkpoint, {checkpoint}, is kept"
        if checkpoint
        else "no checkpoint had been written yet"
    )
    lr = record.values["lr"]
    message = (
        f"training diverged: {error.what} became {error.value} at step {record.step} "
        f"(lr {lr:.3g}); the run stopped and {kept}; lower the learning rate"
        + (" or use more tangents." if config.estimator != "backprop" else ".")
    )
    return TrainingDiverged(message, record.step, error.value, checkpoint)
