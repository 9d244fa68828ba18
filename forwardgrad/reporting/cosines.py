"""The variance study in a report: each run's cosine between its estimates and the gradients
they target (``metrics.csv``'s ``cosine_to_gradient``), as a table column and a plot."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from forwardgrad.experiments.schema import COSINE_COLUMN
from forwardgrad.reporting import markdown
from forwardgrad.reporting.runs import Run, any_finite, format_number

COSINE_HEADER = "mean cosine to its target gradient"
COSINE_NOTE = (
    "Cosine to its target gradient: every {every} steps, the cosine similarity between the "
    "estimate and the exact gradient (autograd) of the loss the estimator targets, on the same "
    "mini-batch and parameters (the model's loss; with local losses, the sum of the blocks' "
    "local losses; with local guesses, the model's loss for the blocks and the local losses for "
    "the heads). 1 is the exact gradient; one random tangent in n dimensions gives about "
    "√(2/(πn)). The measurement is not timed and does not change training."
)


def has_cosines(runs: Sequence[Run]) -> bool:
    """Whether any run measured the cosine."""
    return any(any_finite(run.metrics[COSINE_COLUMN]) for run in runs)


def mean_cosine(run: Run) -> str:
    """The mean of a run's measured cosines, as a table cell."""
    values = run.metrics[COSINE_COLUMN]
    values = values[np.isfinite(values)]
    return format_number(float(values.mean()) if len(values) else math.nan, ".3g")


def cosine_note(runs: Sequence[Run]) -> list[str]:
    """What the cosine column measures, said once under the table (none without one)."""
    if not has_cosines(runs):
        return []
    intervals = sorted({int(run.config.get("cosine_every") or 0) for run in runs} - {0})
    every = ", ".join(map(str, intervals)) or "a few"
    return [markdown.text(COSINE_NOTE.format(every=every)), ""]


def plot_cosines(ax, section, colors: dict, label) -> None:
    """One line per run: its cosines against the step (log scale: single tangents give cosines
    near 1/√n, backprop 1)."""
    for run in section.runs:
        steps, values = run.metrics["step"], run.metrics[COSINE_COLUMN]
        ok = np.isfinite(steps) & np.isfinite(values)
        if ok.any():
            color = colors[run.label]
            ax.plot(steps[ok], values[ok], "o-", color=color, markersize=3, label=label(run))
    positive = [run.metrics[COSINE_COLUMN] for run in section.runs]
    if all((v[np.isfinite(v)] > 0).all() for v in positive):
        ax.set_yscale("log")
