"""The loss threshold of a comparison: the smoothing of noisy mini-batch losses, the threshold
every qualifying run reaches, and when each run reaches it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from forwardgrad.reporting.runs import Run

# Mini-batch losses are noisy: the threshold rule compares a trailing mean over this many logged
# rows, so that one lucky batch does not count as "reached". Test functions are deterministic.
SMOOTHING_ROWS = 10
# A run sets the threshold only if it lowered its loss by at least this fraction; otherwise a run
# that barely moved (e.g. zeroth-order at the paper's tiny lr) would make the threshold trivial.
MIN_IMPROVEMENT = 0.10


def trailing_mean(values: np.ndarray, window: int = SMOOTHING_ROWS) -> np.ndarray:
    """Mean of the last ``window`` values at each position (fewer at the start); a window that
    holds a non-finite value gives NaN."""
    finite = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    bad = np.concatenate([[0], np.cumsum(~finite)])
    end = np.arange(1, len(values) + 1)
    start = np.maximum(end - window, 0)
    with np.errstate(invalid="ignore"):
        mean = (sums[end] - sums[start]) / (end - start)
    mean[(bad[end] - bad[start]) > 0] = math.nan
    return mean


def smoothed_train_loss(run: Run) -> np.ndarray:
    """Trailing mean of the train loss over the last ``SMOOTHING_ROWS`` logged rows.

    Fewer rows at the start. Test functions have a deterministic loss and are not smoothed. A
    window holding a non-finite value gives NaN.
    """
    window = 1 if run.is_test_function else SMOOTHING_ROWS
    return trailing_mean(run.metrics["train_loss"], window)


def loss_threshold(runs: Sequence[Run]) -> float | None:
    """The stated threshold: the highest final smoothed train loss among the runs that did not
    diverge and lowered their smoothed loss by at least ``MIN_IMPROVEMENT`` of its initial value.

    Every such run reaches it, so "time to reach it" compares them all on one loss. Returns None
    when no run qualifies.
    """
    finals = []
    for run in runs:
        smoothed = smoothed_train_loss(run)
        if run.diverged or len(smoothed) < 2 or not np.isfinite(smoothed[[0, -1]]).all():
            continue
        if smoothed[-1] <= (1 - MIN_IMPROVEMENT) * smoothed[0]:
            finals.append(float(smoothed[-1]))
    return max(finals) if finals else None


def time_to_threshold(run: Run, threshold: float) -> tuple[int, float] | None:
    """(step, training time in s) of the first logged row whose smoothed loss is <= threshold."""
    reached = np.flatnonzero(smoothed_train_loss(run) <= threshold)
    if not len(reached):
        return None
    row = reached[0]
    return int(run.metrics["step"][row]), float(run.metrics["time_s"][row])


def threshold_rule(runs: Sequence[Run]) -> str:
    kinds = {run.is_test_function for run in runs}
    averaged = (
        f"averaged over the last {SMOOTHING_ROWS} logged rows, since mini-batch losses are noisy"
    )
    smoothing = {
        frozenset({True}): "the train loss",
        frozenset({False}): f"the train loss {averaged}",
        frozenset({True, False}): f"the train loss (for data sets {averaged})",
    }[frozenset(kinds)]
    return (
        f"Loss threshold, per section: the highest final value of {smoothing}, among the runs "
        f"that did not diverge and lowered it by at least {MIN_IMPROVEMENT:.0%}. Steps and time "
        "to threshold: the first logged step where that loss is at or below it, and the training "
        "time so far, which includes one-time costs of the first steps that the median time "
        f"per iteration leaves out. Final train loss: the mean of the last {SMOOTHING_ROWS} logged "
        "mini-batch losses (test functions: the last value)."
    )
