"""What happens around the training steps, one callback per concern: the learning-rate schedule,
evaluation, Frank-Wolfe gaps, the metrics log, rank checks, checkpoints, progress and signals.

The loop (``forwardgrad.experiments.loop``) calls, in list order, ``on_start`` once,
``before_step`` and ``after_step`` around every update, ``on_diverged`` if the loss stops being
finite, then ``on_train_end`` and ``on_final_row`` (the row of the final parameters), and ``close``
in every case. A callback may raise ``StopRequested`` from ``after_step`` to stop the run after a
checkpoint.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from forwardgrad.distributed import DEFAULT_CHECK_EVERY
from forwardgrad.experiments import checkpoints as ckpt
from forwardgrad.experiments.optimizers import exact_frank_wolfe_gap
from forwardgrad.experiments.rundir import MetricsLog, NoMetricsLog

if TYPE_CHECKING:
    from forwardgrad.experiments.loop import RunState


@dataclass(frozen=True)
class Progress:
    """What the loop reports after every step (and once before the first).

    Attributes:
        step: updates applied so far. total_steps: updates planned. start_step: where this call
        began (non-zero when resuming). train_loss: the latest mini-batch loss (None before the
        first step). lr: the learning rate of the latest step. time_s: training time so far.
        test_loss, test_accuracy: the latest evaluation, if any. label: what is training.
    """

    step: int
    total_steps: int
    start_step: int
    train_loss: float | None
    lr: float
    time_s: float
    test_loss: float | None = None
    test_accuracy: float | None = None
    label: str = ""


@dataclass
class StepRecord:
    """One step's row of ``metrics.csv`` while it is being filled, and whether it evaluated."""

    step: int
    values: dict[str, Any] = field(default_factory=dict)
    evaluated: bool = False

    @property
    def done(self) -> int:
        """Updates applied once this step is taken."""
        return self.step + 1


class StopRequested(Exception):
    """Raised by a callback to stop the run between two steps (a signal, a Ctrl-C)."""

    def __init__(self, signal_number: int):
        super().__init__(signal_number)
        self.signal_number = signal_number


class Terminated(KeyboardInterrupt):
    """SIGTERM raised like Ctrl-C's KeyboardInterrupt, where a command stops at once."""

    signal_number = signal.SIGTERM


class Callback:
    """Does nothing; a callback overrides the hooks it needs (see the module docstring)."""

    def on_start(self, run: RunState) -> None:
        pass

    def before_step(self, run: RunState, record: StepRecord) -> None:
        pass

    def after_step(self, run: RunState, record: StepRecord) -> None:
        pass

    def on_diverged(self, run: RunState, record: StepRecord) -> None:
        pass

    def on_train_end(self, run: RunState) -> None:
        pass

    def on_final_row(self, run: RunState, record: StepRecord) -> None:
        pass

    def close(self) -> None:
        pass


def due(step: int, every: int) -> bool:
    """Whether an interval of ``every`` steps (0: never) falls on ``step``."""
    return every > 0 and step % every == 0


class LearningRateSchedule(Callback):
    """Sets η₀ exp(−i k) in the optimizer before each step (Frank-Wolfe keeps its own γ_t)."""

    def before_step(self, run: RunState, record: StepRecord) -> None:
        for group in run.optimizer.param_groups:
            group["lr"] = record.values["lr"]


class Evaluation(Callback):
    """Evaluates every ``eval_every`` steps and at the end (untimed), into the row."""

    def __init__(self, every: int):
        self.every = every

    def before_step(self, run: RunState, record: StepRecord) -> None:
        if not due(record.step, self.every):
            return
        record.evaluated = True
        with run.untimed():
            run.last_eval = run.task.evaluate(run.model)
        record.values["test_loss"], record.values["test_accuracy"] = run.last_eval

    def on_final_row(self, run: RunState, record: StepRecord) -> None:
        run.last_eval = run.task.evaluate(run.model)
        record.values["test_loss"], record.values["test_accuracy"] = run.last_eval


class FrankWolfeGaps(Callback):
    """Frank-Wolfe's step size and gap of each update, and the exact gap at evaluation rows
    (test functions: at logged rows), computed on rank 0 only."""

    def __init__(self, log_every: int, test_function: bool):
        self.log_every, self.test_function = log_every, test_function

    def _exact(self, run: RunState) -> float | None:
        if not run.is_main:
            return None
        with run.untimed():
            return exact_frank_wolfe_gap(run.optimizer, run.task.gap_closure(run.model))

    def before_step(self, run: RunState, record: StepRecord) -> None:
        if record.evaluated or (self.test_function and due(record.step, self.log_every)):
            record.values["fw_gap_exact"] = self._exact(run)

    def after_step(self, run: RunState, record: StepRecord) -> None:
        sizes = run.optimizer.last_group_step_sizes
        lr = next((size for size in sizes if size is not None), record.values["lr"])
        record.values["lr"], record.values["fw_gap"] = lr, run.optimizer.last_gap

    def on_final_row(self, run: RunState, record: StepRecord) -> None:
        if run.is_main:
            gap = exact_frank_wolfe_gap(run.optimizer, run.task.gap_closure(run.model))
            record.values["fw_gap_exact"] = gap


class MetricsLogger(Callback):
    """Writes evaluated rows and every ``log_every``-th row to ``metrics.csv`` (rank 0 only)."""

    def __init__(self, log: MetricsLog | NoMetricsLog, every: int):
        self.log, self.every = log, every

    def after_step(self, run: RunState, record: StepRecord) -> None:
        if record.evaluated or due(record.step, self.every):
            self.log.write(record.values)

    def on_diverged(self, run: RunState, record: StepRecord) -> None:
        self.log.write(record.values)

    def on_final_row(self, run: RunState, record: StepRecord) -> None:
        self.log.write(record.values)

    def close(self) -> None:
        self.log.close()


class RankCheck(Callback):
    """Checks that the ranks of a data-parallel job hold the same parameters: after the first
    step (ranks that drew different tangents differ at once), every few hundred, at the end."""

    def __init__(self, every: int = DEFAULT_CHECK_EVERY):
        self.every = every

    def after_step(self, run: RunState, record: StepRecord) -> None:
        if record.done == run.start + 1 or record.done % self.every == 0:
            run.world.check_parameters(run.model, record.done)

    def on_train_end(self, run: RunState) -> None:
        run.world.check_parameters(run.model, run.steps)


def _params_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class Checkpoints(Callback):
    """Checkpoints every ``every`` steps (0: none) and at the end, on rank 0; the loop also
    saves one when the run is stopped. A step is saved once, and only with finite parameters."""

    def __init__(self, directory: Path, every: int, loaded: ckpt.LoadedCheckpoint | None):
        self.directory, self.every = directory, every
        self.saved_at = loaded.step if loaded else None
        self.newest = loaded.path if loaded else None

    def save(self, run: RunState, step: int) -> Path | None:
        """Save the state after ``step`` updates; returns the newest checkpoint."""
        if self.saved_at == step or not _params_finite(run.model) or not run.is_main:
            return self.newest
        state = {
            "step": step,
            "elapsed_s": run.elapsed,
            "step_times_s": run.step_times,
            "peak_memory_bytes": run.peak_memory_bytes,
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "estimator": run.estimator.state_dict(),
            "data": run.task.state_dict(),
            "rng": ckpt.capture_rng_state(),
        }
        self.newest = ckpt.save_checkpoint(self.directory, state, step)
        self.saved_at = step
        return self.newest

    def last_good(self, diverged_at: int) -> Path | None:
        """Delete checkpoints of parameters whose loss was not finite; return the newest left.

        A checkpoint is written before the loss of its parameters is known, so the one taken
        at the step that diverged holds finite parameters with an infinite loss: resuming it
        would only diverge again.
        """
        for step, path in ckpt.list_checkpoints(self.directory):
            if step < diverged_at:
                return path
            path.unlink(missing_ok=True)
        return None

    def after_step(self, run: RunState, record: StepRecord) -> None:
        if due(record.done, self.every):
            with run.untimed():
                self.save(run, record.done)

    def on_train_end(self, run: RunState) -> None:
        self.save(run, run.steps)


class ProgressReport(Callback):
    """Sends a ``Progress`` event before the first step and after each; a KeyboardInterrupt
    raised by the receiver stops the run like SIGINT."""

    def __init__(self, progress: Callable[[Progress], None]):
        self.progress = progress

    def _event(self, run: RunState, step: int, lr: float) -> Progress:
        test_loss, test_accuracy = run.last_eval if run.last_eval else (None, None)
        return Progress(
            step, run.steps, run.start, run.last_loss, lr, run.elapsed, test_loss, test_accuracy,
            run.label,
        )  # fmt: skip

    def on_start(self, run: RunState) -> None:
        self.progress(self._event(run, run.start, run.step_size(run.start)))

    def after_step(self, run: RunState, record: StepRecord) -> None:
        try:
            self.progress(self._event(run, record.done, record.values["lr"]))
        except Terminated:
            raise StopRequested(signal.SIGTERM) from None
        except KeyboardInterrupt:
            raise StopRequested(signal.SIGINT) from None


class SignalStop(Callback):
    """Stops the run after the step during which SIGINT or SIGTERM arrived, or after the final
    checkpoint or the final row if it arrived while they were being made."""

    def __init__(self, received: list[int]):
        self.received = received

    def _check(self) -> None:
        if self.received:
            raise StopRequested(self.received[0])

    def after_step(self, run: RunState, record: StepRecord) -> None:
        self._check()

    def on_train_end(self, run: RunState) -> None:
        self._check()

    def on_final_row(self, run: RunState, record: StepRecord) -> None:
        self._check()
