"""Choosing a learning rate: a short run per candidate, scored on held-out data."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from forwardgrad.errors import ConfigurationError
from forwardgrad.experiments.callbacks import Progress
from forwardgrad.experiments.checks import check_number
from forwardgrad.experiments.config import TrainConfig
from forwardgrad.experiments.loop import TrainingDiverged, TrainingInterrupted, train

DEFAULT_LR_CANDIDATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


@dataclass(frozen=True)
class SweepResult:
    """The learning rate a sweep picked and every candidate's score.

    Attributes:
        best_lr: the candidate with the lowest score (the smallest one if every run diverged).
        scores: candidate -> final loss on the held-out split (test functions: the final value
            of the function); ``inf`` for a run that diverged.
        criterion: what the scores are, in words.
    """

    best_lr: float
    scores: dict[float, float]
    criterion: str

    def record(self, steps: int) -> dict[str, Any]:
        """What ``lr_sweep.json`` holds: the choice, how it was made and every score."""
        return {
            "best_lr": self.best_lr,
            "criterion": self.criterion,
            "steps_per_candidate": steps,
            "scores": {
                f"{lr:g}": (s if math.isfinite(s) else None) for lr, s in self.scores.items()
            },
        }


def sweep_learning_rate(
    config: TrainConfig,
    candidates: Sequence[float] = DEFAULT_LR_CANDIDATES,
    *,
    steps: int | None = None,
    validation_fraction: float = 0.1,
    progress: Callable[[Progress], None] | None = None,
    download: bool = True,
) -> SweepResult:
    """Train briefly at each candidate lr and pick the one with the lowest held-out loss.

    For data sets, ``validation_fraction`` of the training set is held out (the test set is
    never looked at) and each candidate is scored by its final loss there. Test functions have
    no data: the score is the function's final value. Runs go to temporary directories.

    Args:
        config: the run to tune; its lr is replaced by each candidate.
        candidates: positive learning rates to try.
        steps: steps per candidate (default: ``config``'s own budget).
        validation_fraction: the held-out part of the training set.
        progress: receives every candidate's progress, labelled with the candidate.
        download: whether a missing data set may be downloaded.

    Returns:
        A ``SweepResult``.
    """
    if not candidates:
        raise ConfigurationError("give at least one candidate learning rate to sweep.")
    for lr in candidates:
        check_number("candidate lr", lr, low=0, strict=True)
    base = replace(
        config,
        steps=steps if steps is not None else config.steps,
        epochs=None if steps is not None else config.epochs,
        validation_fraction=0.0 if config.is_test_function else validation_fraction,
        eval_every=0,
        checkpoint_every=0,
        cosine_every=0,
        lr_selected_by="fixed",
    )
    scores = {lr: _score(replace(base, lr=lr), progress, download) for lr in candidates}
    best = min(candidates, key=lambda lr: (scores[lr], lr))
    criterion = (
        f"final value of {config.problem}"
        if config.is_test_function
        else f"final loss on a held-out {validation_fraction:.0%} of the training set"
    )
    return SweepResult(best_lr=best, scores=scores, criterion=criterion)


def _score(
    config: TrainConfig, progress: Callable[[Progress], None] | None, download: bool
) -> float:
    """One candidate's final held-out loss (test functions: final value); inf if it diverged."""
    labelled = None
    if progress is not None:

        def labelled(event: Progress) -> None:
            progress(replace(event, label=f"lr sweep {config.lr:g}: {event.label}"))

    with tempfile.TemporaryDirectory(prefix="forwardgrad-sweep-") as run_dir:
        try:
            summary = train(config, run_dir, labelled, download=download).summary
        except TrainingDiverged:
            return math.inf
        except TrainingInterrupted as stop:  # its checkpoint goes with the temporary directory
            raise TrainingInterrupted(stop.step, stop.signal_number, None, None) from None
    score = summary["final_train_loss" if config.is_test_function else "final_test_loss"]
    return math.inf if score is None else float(score)
