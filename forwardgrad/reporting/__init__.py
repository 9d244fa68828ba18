"""Plots and ``report.md`` for forwardgrad runs and comparisons, drawn from the logs alone.

A run directory (one estimator on one problem) holds ``config.json``, ``metrics.csv`` (one row per
logged step: ``step,time_s,train_loss,lr,test_loss,test_accuracy`` and, for test functions,
``distance_to_optimum,x0,x1``) and ``summary.json``. This module only reads those files, so
``forwardgrad plot RUN_DIR...`` can redraw everything at any time.

Frank-Wolfe runs (``optimizer`` ``frank-wolfe`` in config.json) add ``fw_gap`` (each update's gap
with the direction it used) and ``fw_gap_exact`` (the gap with the exact gradient, at evaluation
rows); they are compared within their own experiment ("logreg, Frank-Wolfe in l1:10"), with plots
of the gap against iterations.

As in Baydin et al. (2022), the plots show the loss against iterations and against wall-clock
time (log scale), one curve per estimator, and for 2-D test functions the optimisation
trajectories over a contour plot. The report tabulates, per estimator, the median time per
iteration and its ratio to backprop measured in the same comparison, the final losses, test
accuracy, the time to reach a stated loss threshold and peak memory, and puts the paper's claims
beside ours.

Matplotlib is used through ``Figure`` + ``FigureCanvasAgg`` directly: no pyplot, no global backend.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

__all__ = [
    "Run",
    "find_run_dirs",
    "loss_threshold",
    "plot_runs",
    "read_run",
    "smoothed_train_loss",
    "time_to_threshold",
    "write_comparison_report",
    "write_run_report",
]

METRIC_COLUMNS = (
    "step",
    "time_s",
    "train_loss",
    "lr",
    "test_loss",
    "test_accuracy",
    "distance_to_optimum",
    "x0",
    "x1",
    "fw_gap",
    "fw_gap_exact",
)
TEST_FUNCTIONS = ("beale", "rosenbrock")
FRANK_WOLFE = "frank-wolfe"

# Mini-batch losses are noisy: the threshold rule compares a trailing mean over this many logged
# rows, so that one lucky batch does not count as "reached". Test functions are deterministic.
SMOOTHING_ROWS = 10
# A run sets the threshold only if it lowered its loss by at least this fraction; otherwise a run
# that barely moved (e.g. zeroth-order at the paper's tiny lr) would make the threshold trivial.
MIN_IMPROVEMENT = 0.10

TIMING_NOTE = (
    "Timings were measured on this machine{machine}. Wall-clock time counts training only: "
    "evaluation, logging and checkpointing are excluded."
)


# ----------------------------------------------------------------------------------------------
# Reading run directories


@dataclass(frozen=True)
class Run:
    """One run directory, read: its config, its summary and its metrics as float columns.

    ``metrics`` maps every name in ``METRIC_COLUMNS`` to a float array with one entry per logged
    row; empty cells and absent columns are NaN. Fields missing from ``summary.json`` (a run that
    was interrupted before writing it) are derived from the metrics.
    """

    path: Path
    config: dict
    summary: dict
    metrics: dict[str, np.ndarray]

    def _get(self, key, default=None):
        value = self.summary.get(key)
        if value is None:
            value = self.config.get(key)
        return default if value is None else value

    @property
    def problem(self) -> str:
        return str(self._get("problem", "unknown"))

    @property
    def estimator(self) -> str:
        return str(self._get("estimator", self.label.split(" ")[0]))

    @property
    def label(self) -> str:
        """E.g. "forward (K=1, normal, mean)": the summary's label, else built from the config."""
        if self.summary.get("label"):
            return str(self.summary["label"])
        name = label = self.config.get("estimator") or self.path.name
        if name == "forward":
            parts = [f"K={self.config.get('tangents', 1)}"]
            parts += [str(self.config[k]) for k in ("distribution", "combine") if k in self.config]
            label = f"forward ({', '.join(parts)})"
        if name == "zeroth-order":
            tangents, eps = self.config.get("tangents", 1), self.config.get("eps")
            label = f"zeroth-order (K={tangents}, eps={eps})"
        if self.is_frank_wolfe:
            averaged = self.config.get("fw_averaging", True)
            label = f"{label}, Frank-Wolfe {'averaged' if averaged else 'raw'}"
        return str(label)

    @property
    def is_frank_wolfe(self) -> bool:
        return self.config.get("optimizer") == FRANK_WOLFE

    @property
    def experiment(self) -> str:
        """What runs are compared within: the problem, or e.g. "logreg, Frank-Wolfe in l1:10"."""
        if self.is_frank_wolfe:
            return f"{self.problem}, Frank-Wolfe in {self.config.get('constraint')}"
        return self.problem

    @property
    def lr_text(self) -> str:
        """The lr as reports show it: a number, or a schedule such as "2/(t+2)" (Frank-Wolfe)."""
        value = self._get("lr")
        if isinstance(value, str) and math.isnan(_number(value)):
            return value
        return _fmt(self.lr, ".3g")

    @property
    def lr(self) -> float:
        lr = _number(self._get("lr"))
        if math.isnan(lr) and len(self.metrics["lr"]):
            lr = float(self.metrics["lr"][0])
        return lr

    @property
    def lr_selected_by(self) -> str:
        return str(self._get("lr_selected_by", "fixed"))

    @property
    def is_test_function(self) -> bool:
        return self.problem in TEST_FUNCTIONS or _any_finite(self.metrics["distance_to_optimum"])

    @property
    def dim(self) -> int:
        return int(self.config.get("dim") or 2)

    @property
    def diverged(self) -> bool:
        loss = self.metrics["train_loss"]
        return bool(self.summary.get("diverged")) or bool(np.any(np.isinf(loss) | np.isnan(loss)))

    @property
    def last_finite_row(self) -> int | None:
        """Index of the last row whose train loss is finite (None if there is none)."""
        finite = np.flatnonzero(np.isfinite(self.metrics["train_loss"]))
        return int(finite[-1]) if len(finite) else None

    @property
    def steps(self) -> int:
        steps = self.summary.get("steps")
        if steps is None and len(self.metrics["step"]):
            steps = np.nanmax(self.metrics["step"])
        return int(steps or 0)

    @property
    def final_train_loss(self) -> float:
        loss = _number(self.summary.get("final_train_loss"))
        if math.isnan(loss) and self.last_finite_row is not None and not self.diverged:
            loss = float(self.metrics["train_loss"][self.last_finite_row])
        return loss

    @property
    def final_test_accuracy(self) -> float:
        accuracy = _number(self.summary.get("final_test_accuracy"))
        return _last_finite(self.metrics["test_accuracy"]) if math.isnan(accuracy) else accuracy

    @property
    def final_distance_to_optimum(self) -> float:
        distance = _number(self.summary.get("final_distance_to_optimum"))
        if math.isnan(distance):
            distance = _last_finite(self.metrics["distance_to_optimum"])
        return distance

    @property
    def median_step_time_s(self) -> float:
        """The summary's median step time; else the median over logged intervals of Δtime/Δstep."""
        median = _number(self.summary.get("median_step_time_s"))
        if math.isnan(median):
            steps, times = self.metrics["step"], self.metrics["time_s"]
            d_step, d_time = np.diff(steps), np.diff(times)
            ok = (d_step > 0) & np.isfinite(d_time)
            if ok.any():
                median = float(np.median(d_time[ok] / d_step[ok]))
        return median

    @property
    def peak_memory(self) -> tuple[float, str]:
        """(peak memory in bytes, the method that measured it), NaN and "" if not recorded."""
        method = self.summary.get("peak_memory_method") or ""
        return _number(self.summary.get("peak_memory_bytes")), str(method)


def read_run(run_dir: str | os.PathLike) -> Run:
    """Read one run directory; only ``metrics.csv`` is required (config and summary are optional).

    Args:
      run_dir: a directory written by ``forwardgrad train`` (or one run of ``compare``).

    Returns:
      A ``Run``.
    """
    path = Path(run_dir)
    metrics_path = path / "metrics.csv"
    if not metrics_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a run directory: it has no metrics.csv; pass a directory written by "
            "`forwardgrad train`, `compare` or `reproduce`."
        )
    return Run(
        path=path,
        config=_read_json(path / "config.json"),
        summary=_read_json(path / "summary.json"),
        metrics=_read_metrics(metrics_path),
    )


def find_run_dirs(path: str | os.PathLike) -> list[Path]:
    """The run directories at ``path``: itself if it holds metrics.csv, else the ones below it.

    Args:
      path: a run directory, or the ``--out`` directory of ``compare`` / ``reproduce``.

    Returns:
      Run directories, sorted by path.
    """
    path = Path(path)
    if (path / "metrics.csv").is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} does not exist; pass a run directory or a comparison's --out."
        )
    runs = sorted(p.parent for p in path.rglob("metrics.csv") if "checkpoints" not in p.parts)
    if not runs:
        raise FileNotFoundError(
            f"{path} holds no run directory (no metrics.csv at or below it); pass a directory "
            "written by `forwardgrad train`, `compare` or `reproduce`."
        )
    return runs


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); rerun or delete that file."
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, found {type(data).__name__}.")
    return data


def _read_metrics(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        if not reader.fieldnames or "step" not in reader.fieldnames:
            raise ValueError(
                f"{path} has no header with a 'step' column; expected columns "
                f"{','.join(METRIC_COLUMNS[:6])}."
            )
        rows = list(reader)
    columns = {}
    for name in METRIC_COLUMNS:
        values = []
        for line, row in enumerate(rows, start=2):
            cell = (row.get(name) or "").strip()
            try:
                values.append(float(cell) if cell else math.nan)
            except ValueError:
                raise ValueError(
                    f"{path}:{line}: column {name!r} holds {cell!r}, not a number; "
                    "fix or delete that row."
                ) from None
        columns[name] = np.asarray(values, dtype=float)
    return columns


def _number(value) -> float:
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def _any_finite(values: np.ndarray) -> bool:
    return bool(np.isfinite(values).any())


def _last_finite(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if len(finite) else math.nan


# ----------------------------------------------------------------------------------------------
# The loss threshold


def smoothed_train_loss(run: Run) -> np.ndarray:
    """Trailing mean of the train loss over the last ``SMOOTHING_ROWS`` logged rows.

    Fewer rows at the start. Test functions have a deterministic loss and are not smoothed. A
    window holding a non-finite value gives NaN.
    """
    loss = run.metrics["train_loss"]
    window = 1 if run.is_test_function else SMOOTHING_ROWS
    finite = np.isfinite(loss)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, loss, 0.0))])
    bad = np.concatenate([[0], np.cumsum(~finite)])
    end = np.arange(1, len(loss) + 1)
    start = np.maximum(end - window, 0)
    with np.errstate(invalid="ignore"):
        mean = (sums[end] - sums[start]) / (end - start)
    mean[(bad[end] - bad[start]) > 0] = math.nan
    return mean


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


def _threshold_rule(runs: Sequence[Run]) -> str:
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
        "per iteration leaves out. Final train loss: the last logged value."
    )


# ----------------------------------------------------------------------------------------------
# Plots


def _new_figure(panels: int, height: float = 4.2) -> tuple[Figure, list]:
    figure = Figure(figsize=(6.4 * panels, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    return figure, list(axes)


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=110)
    return path


def _colors(labels: Iterable[str]) -> dict[str, tuple]:
    """One colour per estimator label, the same in every plot of a problem."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    unique = list(dict.fromkeys(labels))
    return {label: palette[i % len(palette)] for i, label in enumerate(unique)}


def _curve_label(run: Run, show_lr: bool) -> str:
    label = f"{run.label}, lr {run.lr_text}" if show_lr else run.label
    return label + " (diverged)" if run.diverged else label


def _plot_curve(ax, x: np.ndarray, y: np.ndarray, run: Run, color, label: str | None) -> None:
    """One run's curve; non-finite points are dropped and a divergence ends in a cross."""
    ok = np.isfinite(x) & np.isfinite(y)
    ax.plot(x[ok], y[ok], color=color, linewidth=1.3, label=label)
    if run.diverged and ok.any():
        last = np.flatnonzero(ok)[-1]
        ax.plot(x[last], y[last], "x", color=color, markersize=10, markeredgewidth=2)


class _PlainLogFormatter(LogFormatter):
    """Log-axis tick labels as plain numbers (2, 0.5, 1e-05), which read better than 2×10⁰;
    which ticks get a label is left to matplotlib's LogFormatter."""

    def __call__(self, x, pos=None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def _log_scale_if_positive(ax, values: Iterable[np.ndarray]) -> None:
    """Log y axis when there is positive data; non-positive points are masked, not clipped."""
    if any((np.isfinite(v) & (v > 0)).any() for v in values):
        ax.set_yscale("log", nonpositive="mask")
        ax.yaxis.set_major_formatter(_PlainLogFormatter())
        ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False))


def _finish(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _plot_loss(ax, section: _Section, x_column: str, colors: dict) -> None:
    """Train loss per run; mini-batch losses faint, with their trailing mean (the threshold's)."""
    noisy = False
    for run in section.runs:
        x, loss, color = run.metrics[x_column], run.metrics["train_loss"], colors[run.label]
        if not run.is_test_function:
            noisy = True
            ok = np.isfinite(x) & np.isfinite(loss)
            ax.plot(x[ok], loss[ok], color=color, linewidth=0.7, alpha=0.25)
            loss = smoothed_train_loss(run)
        _plot_curve(ax, x, loss, run, color, _curve_label(run, section.show_lr))
    if noisy:
        label = f"faint: logged loss; solid: mean of last {SMOOTHING_ROWS}"
        ax.plot([], [], color="gray", alpha=0.4, label=label)
    if section.threshold is not None:
        ax.axhline(
            section.threshold, color="gray", linestyle="--", linewidth=0.8, label="threshold"
        )
    _log_scale_if_positive(ax, [run.metrics["train_loss"] for run in section.runs])
    times = np.concatenate([run.metrics[x_column] for run in section.runs])
    if x_column == "time_s" and not (np.isfinite(times) & (times != 0)).any():
        note = "no training time was recorded (time_s is 0 or empty in every row)"
        box = {"facecolor": "white", "alpha": 0.85, "edgecolor": "none"}
        ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", bbox=box)


def _plot_accuracy(ax, section: _Section, colors: dict) -> None:
    for run in section.runs:
        steps, accuracy = run.metrics["step"], run.metrics["test_accuracy"]
        ok = np.isfinite(steps) & np.isfinite(accuracy)
        label = _curve_label(run, section.show_lr)
        ax.plot(steps[ok], accuracy[ok], "o-", color=colors[run.label], markersize=3, label=label)
    ax.set_xlim(left=0)


def _test_function(run: Run):
    """The problem's test function (experiments.problems), or None where it cannot be built."""
    try:
        from forwardgrad.experiments.problems import make_test_function

        return make_test_function(run.problem, run.dim)
    except (ImportError, ValueError):
        return None


def _evaluate_on_grid(fn, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """f on the grid xs × ys (rows: y); a test function's ``fn`` maps points (..., 2) to (...)."""
    import torch

    grid = torch.as_tensor(np.stack(np.meshgrid(xs, ys), axis=-1))
    with torch.no_grad():
        return fn(grid).double().numpy()


def _view_box(bounds, minimizer: np.ndarray, trajectories: list[np.ndarray]):
    """(low, high) corners framing the trajectories and the minimum, with a margin.

    The frame is at least a quarter of the function's bounds wide, so a short run still shows the
    landscape, and at most the bounds widened by their size on each side, so a run that diverged
    does not shrink the landscape to a dot.
    """
    bounds = np.asarray(bounds, dtype=float)  # rows: (low, high) per coordinate
    points = np.concatenate(
        [minimizer[None, :2]] + [t[np.isfinite(t).all(axis=1)] for t in trajectories]
    )
    width = bounds[:, 1] - bounds[:, 0]
    low, high = points.min(axis=0), points.max(axis=0)
    centre = (low + high) / 2
    half = np.maximum((high - low) * 0.6, width / 8)
    low = np.maximum(centre - half, bounds[:, 0] - width)
    high = np.minimum(centre + half, bounds[:, 1] + width)
    return low, high


def _plot_contour(ax, test_function, low: np.ndarray, high: np.ndarray) -> None:
    xs = np.linspace(low[0], high[0], 160)
    ys = np.linspace(low[1], high[1], 160)
    values = _evaluate_on_grid(test_function.fn, xs, ys)
    minimizer = np.asarray(test_function.minimizer, dtype=float).ravel()[:2]
    f_min = float(np.nanmin(values))
    # The test functions span many orders of magnitude: log-spaced levels above the minimum.
    shifted = values - f_min
    top = float(np.nanmax(shifted))
    if top > 0:
        positive = shifted[shifted > 0]
        bottom = max(float(positive.min()), top * 1e-7)
        levels = np.logspace(np.log10(bottom), np.log10(top), 25)
        ax.contour(
            xs,
            ys,
            np.maximum(shifted, bottom),
            levels=levels,
            norm=LogNorm(),
            cmap="viridis",
            linewidths=0.6,
            alpha=0.7,
        )
    ax.plot(*minimizer, "*", color="black", markersize=14, label="minimum", zorder=5)


def _plot_trajectories(ax, section: _Section, colors: dict, test_function) -> None:
    trajectories = [np.stack([r.metrics["x0"], r.metrics["x1"]], axis=1) for r in section.runs]
    if test_function is not None and test_function.bounds is not None:
        minimizer = np.asarray(test_function.minimizer, dtype=float).ravel()
        low, high = _view_box(test_function.bounds, minimizer, trajectories)
        _plot_contour(ax, test_function, low, high)
        ax.set_xlim(low[0], high[0])
        ax.set_ylim(low[1], high[1])
    for run, points in zip(section.runs, trajectories, strict=True):
        points = points[np.isfinite(points).all(axis=1)]
        if not len(points):
            continue
        color = colors[run.label]
        label = _curve_label(run, section.show_lr)
        ax.plot(points[:, 0], points[:, 1], "-", color=color, linewidth=1.0, label=label)
        ax.plot(*points[0], "o", color=color, markersize=5)
        ax.plot(*points[-1], "s" if not run.diverged else "x", color=color, markersize=6)


def _plot_problem(sections: list[_Section], out_dir: Path, prefix: str) -> list[Path]:
    """All plots for one problem: one panel per section (same lr / own lr), one file per kind."""
    runs = [run for section in sections for run in section.runs]
    colors = _colors(run.label for run in runs)
    problem = runs[0].experiment
    written = []

    def draw(kind: str, xlabel: str, ylabel: str, plot_panel) -> None:
        figure, axes = _new_figure(len(sections))
        for ax, section in zip(axes, sections, strict=True):
            plot_panel(ax, section)
            _finish(ax, f"{problem}: {section.title}", xlabel, ylabel)
        written.append(_save(figure, out_dir / f"{prefix}{kind}.png"))

    draw(
        "loss_vs_steps",
        "iteration",
        "train loss (log scale)",
        lambda ax, s: _plot_loss(ax, s, "step", colors),
    )
    draw(
        "loss_vs_time",
        "wall-clock training time (s)",
        "train loss (log scale)",
        lambda ax, s: _plot_loss(ax, s, "time_s", colors),
    )
    if any(_any_finite(run.metrics["test_accuracy"]) for run in runs):
        draw(
            "test_accuracy",
            "iteration",
            "test accuracy",
            lambda ax, s: _plot_accuracy(ax, s, colors),
        )
    two_d = [run for run in runs if run.is_test_function and run.dim == 2]
    if two_d and any(_any_finite(run.metrics["x0"]) for run in two_d):
        test_function = _test_function(two_d[0])
        draw(
            "trajectories",
            "x0",
            "x1",
            lambda ax, s: _plot_trajectories(ax, s, colors, test_function),
        )
    if any(_any_finite(run.metrics["fw_gap_exact"]) for run in runs):
        draw(
            "fw_gap",
            "iteration",
            "Frank-Wolfe gap with the exact gradient (log scale)",
            lambda ax, s: _plot_gap(ax, s, "fw_gap_exact", colors),
        )
    if any(_any_finite(run.metrics["fw_gap"]) for run in runs):
        draw(
            "fw_gap_steps",
            "iteration",
            "Frank-Wolfe gap with each step's direction (log scale)",
            lambda ax, s: _plot_gap(ax, s, "fw_gap", colors),
        )
    return written


def _trailing_mean(values: np.ndarray, window: int = SMOOTHING_ROWS) -> np.ndarray:
    sums = np.concatenate([[0.0], np.cumsum(values)])
    end = np.arange(1, len(values) + 1)
    start = np.maximum(end - window, 0)
    return (sums[end] - sums[start]) / (end - start)


def _plot_gap(ax, section: _Section, column: str, colors: dict) -> None:
    """A Frank-Wolfe gap per run: evaluation-row gaps as points joined by lines; the noisy
    per-step gaps faint, with their trailing mean over SMOOTHING_ROWS logged rows."""
    for run in section.runs:
        steps, gap, color = run.metrics["step"], run.metrics[column], colors[run.label]
        ok = np.isfinite(steps) & np.isfinite(gap)
        label = _curve_label(run, section.show_lr)
        if column == "fw_gap_exact":
            ax.plot(steps[ok], gap[ok], "o-", color=color, markersize=3, label=label)
            continue
        ax.plot(steps[ok], gap[ok], color=color, linewidth=0.7, alpha=0.25)
        ax.plot(steps[ok], _trailing_mean(gap[ok]), color=color, linewidth=1.3, label=label)
    if column == "fw_gap":
        label = f"faint: logged gap; solid: mean of last {SMOOTHING_ROWS}"
        ax.plot([], [], color="gray", alpha=0.4, label=label)
    _log_scale_if_positive(ax, [run.metrics[column] for run in section.runs])


# ----------------------------------------------------------------------------------------------
# Sections and tables


@dataclass
class _Section:
    """The runs of one problem compared under one learning-rate policy."""

    title: str
    heading: str
    runs: list[Run]
    show_lr: bool
    threshold: float | None


def _sections(runs: list[Run]) -> list[_Section]:
    """Split one problem's runs into "same lr (paper setting)" and "each at its own lr"."""
    fixed = [run for run in runs if run.lr_selected_by != "sweep"]
    swept = [run for run in runs if run.lr_selected_by == "sweep"]
    sections = []
    if fixed:
        lrs = {run.lr_text for run in fixed}
        if len(lrs) == 1 and all(run.is_frank_wolfe for run in fixed):
            title = f"step size {next(iter(lrs))}"
            heading = f"Frank-Wolfe with step size {next(iter(lrs))} for every run"
        elif len(lrs) == 1:
            title = f"same lr {next(iter(lrs))}"
            heading = "Paper setting: the same learning rate for every estimator"
        else:
            title, heading = "fixed lr", "Learning rates fixed by the user"
        sections.append(_Section(title, heading, fixed, len(lrs) > 1, loss_threshold(fixed)))
    if swept:
        heading = "Each estimator at its own learning rate (chosen by a sweep on a held-out split)"
        sections.append(_Section("own lr (sweep)", heading, swept, True, loss_threshold(swept)))
    return sections


def _reference_run(runs: Sequence[Run], estimator: str) -> Run | None:
    """The run of that estimator to compare against: single-tangent first, as in the paper."""
    candidates = [run for run in runs if run.estimator == estimator]
    single = [run for run in candidates if int(run.config.get("tangents") or 1) == 1]
    return (single or candidates or [None])[0]


def _ratio(numerator: float, denominator: float) -> float:
    # A zero time or memory means "not measured" (e.g. time_s all zero), not "infinitely fast".
    if (
        math.isfinite(numerator)
        and math.isfinite(denominator)
        and numerator > 0
        and denominator > 0
    ):
        return numerator / denominator
    return math.nan


def _fmt(value: float, spec: str = ".4g", unit: str = "", missing: str = "—") -> str:
    return missing if value is None or not math.isfinite(value) else f"{value:{spec}}{unit}"


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "—"
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def _fmt_memory(run: Run) -> str:
    peak = run.peak_memory[0]
    return f"{peak / 2**20:.1f} MiB" if math.isfinite(peak) else "—"


def _memory_note(runs: Sequence[Run]) -> list[str]:
    """How peak memory was measured, said once under the table (the method names are long)."""
    methods = {run.label: run.peak_memory[1] for run in runs if run.peak_memory[1]}
    if not methods:
        return []
    if len(set(methods.values())) == 1:
        return [f"Peak memory: {next(iter(methods.values()))}.", ""]
    return ["Peak memory: " + "; ".join(f"{k}: {v}" for k, v in methods.items()) + ".", ""]


def _table(section: _Section, backprop: Run | None, comparison: bool = True) -> list[str]:
    """The markdown table; a single run's (comparison=False) has no ratio and no threshold."""
    runs = section.runs
    test_function = all(run.is_test_function for run in runs)
    header = [
        "estimator",
        "lr",
        "lr chosen by",
        "steps",
        "median time / iteration",
        *(["time ÷ backprop"] if comparison else []),
        "final train loss",
        "final distance to optimum" if test_function else "test accuracy",
    ]
    if comparison:
        header += ["steps to threshold", "time to threshold"]
    header += ["peak memory"]
    # Data-parallel runs: what crossed the wire per step is the point of the forward gradient.
    distributed = any((run.config.get("world_size") or 1) > 1 for run in runs)
    if distributed:
        header += ["bytes all-reduced / step"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        ratio = (
            math.nan
            if backprop is None
            else _ratio(run.median_step_time_s, backprop.median_step_time_s)
        )
        if run.diverged:
            row = run.last_finite_row
            at = "" if row is None else f" after step {int(run.metrics['step'][row])}"
            final_loss = f"diverged{at}"
        else:
            final_loss = _fmt(run.final_train_loss)
        if test_function:
            last = _fmt(run.final_distance_to_optimum, ".4g")
        else:
            last = _fmt(run.final_test_accuracy, ".3f")
        cells = [
            run.label + (" ⚠ diverged" if run.diverged else ""),
            run.lr_text,
            run.lr_selected_by,
            str(run.steps),
            _fmt_time(run.median_step_time_s),
            *([_fmt(ratio, ".2f", missing="n/a")] if comparison else []),
            final_loss,
            last,
        ]
        if comparison:
            reached = (
                None if section.threshold is None else time_to_threshold(run, section.threshold)
            )
            if reached is None:
                cells += ["not reached", "not reached"]
            else:
                cells += [str(reached[0]), f"{reached[1]:.3g} s"]
        cells.append(_fmt_memory(run))
        if distributed:
            sent = run.summary.get("bytes_communicated_per_step")
            if sent is None:
                sent = run.config.get("bytes_communicated_per_step")
            cells.append("n/a" if sent is None else f"{int(sent):,}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""] + _memory_note(runs)


# The paper's claims (from docs/PAPER.md) beside ours.


def _claims(problem: str, section: _Section, backprop: Run | None) -> list[str]:
    if any(run.is_frank_wolfe for run in section.runs):  # the SGD claims do not apply
        return _frank_wolfe_claims(section)
    forward = _reference_run(section.runs, "forward")
    rows = []

    def ours_ratio(numerator: float, denominator: float, spec: str = ".2f") -> str:
        return _fmt(_ratio(numerator, denominator), spec, missing="n/a")

    pair = forward is not None and backprop is not None
    if problem == "mlp":
        ours = (
            ours_ratio(forward.median_step_time_s, backprop.median_step_time_s) if pair else "n/a"
        )
        rows.append(
            (
                "time per iteration, forward ÷ backprop",
                "≈ 0.6 for the MLP (paper; a secondary source quotes R_f = 2.46 vs R_b = 4.17, "
                "i.e. 0.59; not confirmed from the paper itself)",
                ours,
            )
        )
    if section.threshold is not None:
        ours = "n/a"
        if pair:
            reached_f = time_to_threshold(forward, section.threshold)
            reached_b = time_to_threshold(backprop, section.threshold)
            if reached_f and reached_b:
                ours = ours_ratio(reached_b[1], reached_f[1])
            else:
                ours = "n/a (not both reached the threshold)"
        if section.show_lr:
            source = (
                "a course report: with backprop's lr tuned separately, backprop converges 2-4× "
                "faster (ratio 0.25-0.5), and forward gradient needed clipping to stay stable"
            )
        else:
            source = (
                "up to ≈ 2 in some cases (paper: forward reaches a given loss up to twice as fast)"
            )
        rows.append(("wall-clock time to the threshold, backprop ÷ forward", source, ours))
    peak_f = forward.peak_memory[0] if forward else math.nan
    peak_b = backprop.peak_memory[0] if backprop else math.nan
    rows.append(
        (
            "peak memory, forward ÷ backprop",
            "about the same (paper's own implementation)",
            ours_ratio(peak_f, peak_b) if pair else "n/a",
        )
    )
    if problem == "mlp" and not section.show_lr:
        ours = "n/a"
        if pair:
            settings = {k: forward.config.get(k) for k in ("batch_size", "lr")}
            ours = (
                f"{_fmt(forward.final_test_accuracy, '.3f')} vs "
                f"{_fmt(backprop.final_test_accuracy, '.3f')} (batch {settings['batch_size']}, "
                f"lr {_fmt(forward.lr, '.3g')}, {forward.steps} steps)"
            )
        rows.append(
            (
                "test accuracy, forward vs backprop at the same lr",
                "0.909 vs 0.884 (independent functorch re-implementation, batch 1024, lr 5e-4; "
                "it saw no speed-up over backprop)",
                ours,
            )
        )
    if problem == "cnn":
        ours = "n/a"
        if pair:
            ours = (
                f"test accuracy {_fmt(forward.final_test_accuracy, '.3f')} (forward) vs "
                f"{_fmt(backprop.final_test_accuracy, '.3f')} (backprop)"
            )
        rows.append(
            (
                "CNN result",
                "the independent re-implementation could not reproduce the paper's CNN result",
                ours,
            )
        )
    if not rows:
        return []
    which = f"forward = {forward.label}" if forward else "no forward run"
    lines = [
        f"Paper's claims beside ours ({which}; ratios of our own measurements in this section):",
        "",
        "| quantity | paper or other source | this comparison |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return lines


def _final_exact_gap(run: Run) -> float:
    return _last_finite(run.metrics["fw_gap_exact"])


def _frank_wolfe_lines(section: _Section) -> list[str]:
    """What the Frank-Wolfe gaps measure, and each run's gaps, under the section's table."""
    runs = [run for run in section.runs if run.is_frank_wolfe]
    if not runs:
        return []
    lines = [
        "Frank-Wolfe gap: gap(x) = max over s in the set of <∇f(x), x − s>, summed over the "
        "parameters; it is ≥ 0 and 0 exactly at the constrained optimum. *Exact*: with the exact "
        "gradient (backprop) of the training loss on a fixed sample (the first 2000 training "
        "examples; test functions: the function), at evaluation rows. *Per step*: with the "
        "direction each update fed to the oracle (the running average, or the raw estimate) on "
        "its mini-batch; noisy, and not comparable between averaged and raw runs.",
        "",
        "| run | exact gap: first | exact gap: smallest | exact gap: last "
        f"| per-step gap: mean of last {SMOOTHING_ROWS} logged |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        exact = run.metrics["fw_gap_exact"]
        exact = exact[np.isfinite(exact)]
        per_step = run.metrics["fw_gap"]
        per_step = per_step[np.isfinite(per_step)][-SMOOTHING_ROWS:]
        cells = [
            run.label,
            _fmt(exact[0] if len(exact) else math.nan),
            _fmt(exact.min() if len(exact) else math.nan),
            _fmt(_final_exact_gap(run)),
            _fmt(float(per_step.mean()) if len(per_step) else math.nan),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _frank_wolfe_claims(section: _Section) -> list[str]:
    """Rostami & Kia (2024) beside our averaged and raw forward-gradient and backprop runs."""

    def ours(run: Run | None) -> str:
        if run is None:
            return "no run"
        return (
            f"exact gap {_fmt(_final_exact_gap(run))}, train loss {_fmt(run.final_train_loss)}"
            + (
                f", test accuracy {_fmt(run.final_test_accuracy, '.3f')}"
                if not run.is_test_function
                else ""
            )
        )

    def first(estimator: str, averaged: bool) -> Run | None:
        return next(
            (
                run
                for run in section.runs
                if run.estimator == estimator and run.config.get("fw_averaging", True) == averaged
            ),
            None,
        )

    averaged, raw = first("forward", True), first("forward", False)
    backprop = first("backprop", True) or first("backprop", False)
    if averaged is None and raw is None:
        return []
    at_end = (
        f"averaged: {ours(averaged)}; raw: {ours(raw)}; backprop ({backprop.label}): "
        f"{ours(backprop)}"
        if backprop
        else f"averaged: {ours(averaged)}; raw: {ours(raw)}"
    )
    return [
        "Paper's claim beside ours (at the end of each run):",
        "",
        "| quantity | paper | this comparison |",
        "|---|---|---|",
        "| Frank-Wolfe fed forward gradients | converges with the running average of forward "
        "gradients, does not converge with the raw forward gradient (Rostami & Kia 2024) | "
        f"{at_end} |",
    ]


# ----------------------------------------------------------------------------------------------
# Reports


def _machine_line(runs: Sequence[Run]) -> str:
    config = runs[0].config
    machine = config.get("machine") or {}
    versions = config.get("versions") or {}
    parts = [
        machine.get("platform"),
        machine.get("processor"),
        f"{machine['cpu_count']} CPUs" if machine.get("cpu_count") else None,
        f"torch {versions['torch']}" if versions.get("torch") else None,
        f"{config['threads']} threads" if config.get("threads") else None,
    ]
    parts = [str(p) for p in parts if p]
    return TIMING_NOTE.format(machine=f" ({', '.join(parts)})" if parts else "")


def _settings_line(runs: Sequence[Run]) -> str:
    """The settings the runs share (those that differ, like lr and steps, are in the table)."""
    keys = (
        "dataset",
        "dim",
        "optimizer",
        "constraint",
        "lr_decay",
        "batch_size",
        "epochs",
        "test_examples",
        "seed",
        "world_size",
    )
    parts = []
    for key in keys:
        if key == "dim" and not all(run.is_test_function for run in runs):
            continue  # a data set's model has no dim, whatever config.json says
        values = {json.dumps(run.config.get(key)) for run in runs}
        if len(values) == 1 and runs[0].config.get(key) is not None:
            parts.append(f"{key.replace('_', ' ')} {runs[0].config[key]}")
    return "Settings: " + (", ".join(parts) if parts else "not recorded") + "."


def _write_text(path: Path, text: str) -> Path:
    """Write via a temporary file and rename, so a reader never sees half a report."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path


def _image_lines(paths: Sequence[Path], base: Path) -> list[str]:
    captions = {
        "loss_vs_steps": "Train loss against iterations (log scale)",
        "loss_vs_time": "Train loss against wall-clock training time (log scale)",
        "test_accuracy": "Test accuracy against iterations",
        "trajectories": "Trajectories over the contour plot (circle: start, square: end)",
        "fw_gap": "Frank-Wolfe gap with the exact gradient against iterations (log scale)",
        "fw_gap_steps": "Frank-Wolfe gap with the direction each step used (log scale)",
    }
    lines = []
    for path in paths:
        caption = next((c for kind, c in captions.items() if path.stem.endswith(kind)), path.stem)
        lines += [f"![{caption}]({path.relative_to(base).as_posix()})", ""]
    return lines


def write_run_report(run_dir: str | os.PathLike) -> Path:
    """Plots (loss vs iterations and vs wall-clock, accuracy, trajectory) and report.md of one run.

    Args:
      run_dir: a run directory (config.json, metrics.csv, summary.json).

    Returns:
      The path of the run's ``report.md``.
    """
    run = read_run(run_dir)
    section = _Section(
        title=f"lr {run.lr_text}", heading="", runs=[run], show_lr=False, threshold=None
    )
    images = _plot_problem([section], run.path, prefix="")
    lines = [
        f"# {run.label} on {run.experiment}",
        "",
        _settings_line([run]),
        "",
        _machine_line([run]),
        "",
    ]
    lines += _table(section, backprop=None, comparison=False)
    lines += _frank_wolfe_lines(section)
    if run.diverged:
        lines += ["The loss became NaN or infinite: the run diverged; the curves stop there.", ""]
    lines += _image_lines(images, run.path)
    command = run.config.get("command")
    if command:
        lines += ["To rerun:", "", "```", shlex.join(str(part) for part in command), "```", ""]
    return _write_text(run.path / "report.md", "\n".join(lines))


def write_comparison_report(
    out_dir: str | os.PathLike,
    run_dirs: Sequence[str | os.PathLike],
    title: str | None = None,
) -> Path:
    """Combined plots and report.md for several runs, one section and one set of plots per problem
    (Frank-Wolfe runs of a problem form their own section, e.g. "logreg, Frank-Wolfe in l1:10").

    Within a problem, runs whose lr was fixed ("paper setting: same lr") and runs whose lr was
    chosen by a sweep ("each estimator at its own lr") are compared separately, each with its own
    loss threshold (the rule is stated in the report) and its own backprop reference for the time
    ratio.

    Args:
      out_dir: where the plots (``<problem>_loss_vs_steps.png`` ...) and ``report.md`` go.
      run_dirs: run directories, possibly of several problems.
      title: the report's title; by default named after the problems.

    Returns:
      The path of ``report.md`` in ``out_dir``.
    """
    if not run_dirs:
        raise ValueError("write_comparison_report needs at least one run directory; got none.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [read_run(path) for path in run_dirs]
    problems = list(dict.fromkeys(run.experiment for run in runs))
    lines = [
        f"# {title or 'forwardgrad comparison: ' + ', '.join(problems)}",
        "",
        _machine_line(runs),
        "",
        _threshold_rule(runs),
        "",
    ]
    for problem in problems:
        problem_runs = [run for run in runs if run.experiment == problem]
        sections = _sections(problem_runs)
        images = _plot_problem(sections, out, prefix=f"{_slug(problem)}_")
        lines += [f"## {problem}", "", _settings_line(problem_runs), ""]
        for section in sections:
            # Ratios use the backprop run of the same section; else any backprop run of the problem.
            backprop = _reference_run(section.runs, "backprop") or _reference_run(
                problem_runs, "backprop"
            )
            lines += [f"### {section.heading}", ""]
            threshold = (
                "no run lowered its loss enough to set one"
                if section.threshold is None
                else f"{section.threshold:.4g}"
            )
            lines += [f"Loss threshold: {threshold}.", ""]
            lines += _table(section, backprop)
            if backprop is None:
                lines += ["No backprop run in this comparison, so no ratio to backprop.", ""]
            lines += _frank_wolfe_lines(section)
            claims = _claims(problem_runs[0].problem, section, backprop)
            lines += claims + ([""] if claims else [])
        lines += _image_lines(images, out)
    return _write_text(out / "report.md", "\n".join(lines))


def plot_runs(
    run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None
) -> list[Path]:
    """Redraw plots and reports from the logs (``forwardgrad plot RUN_DIR...``).

    Every run gets its own report; several runs, or a comparison's ``--out`` directory, also get a
    comparison report, in ``out_dir`` (default: the comparison directory given, else the runs'
    common parent directory).

    Args:
      run_dirs: run directories and/or directories holding run directories.
      out_dir: where the comparison report goes.

    Returns:
      The paths of every ``report.md`` written, the comparison's last.
    """
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run directory; got none.")
    runs = [run for path in run_dirs for run in find_run_dirs(path)]
    runs = list(dict.fromkeys(runs))
    written = [write_run_report(run) for run in runs]
    given_one_comparison = len(run_dirs) == 1 and runs != [Path(run_dirs[0])]
    if len(runs) > 1 or given_one_comparison:
        if out_dir is None:
            out_dir = run_dirs[0] if given_one_comparison else _common_parent(runs)
        written.append(write_comparison_report(out_dir, runs))
    return written


def _common_parent(paths: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([path.resolve().parent for path in paths]))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "run"
