"""The plots of a report, drawn from the logs: loss against iterations and against wall-clock
time (log scale), test accuracy, trajectories over a test function's contours, Frank-Wolfe gaps.

Matplotlib is imported only here, inside the functions that draw, and used through ``Figure`` +
``FigureCanvasAgg`` directly: no pyplot, no global backend.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import numpy as np

from forwardgrad.errors import ForwardGradError
from forwardgrad.experiments.files import atomic_write
from forwardgrad.experiments.problems import make_test_function
from forwardgrad.reporting.cosines import has_cosines, plot_cosines
from forwardgrad.reporting.runs import Run, any_finite
from forwardgrad.reporting.tables import Section
from forwardgrad.reporting.thresholds import SMOOTHING_ROWS, smoothed_train_loss, trailing_mean


def new_figure(panels: int, height: float = 4.2) -> tuple:
    """A figure of ``panels`` axes side by side: (figure, list of axes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4 * panels, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    return figure, list(axes)


def _save(figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return atomic_write(path, buffer.getvalue())


def _colors(labels: Iterable[str]) -> dict[str, tuple]:
    """One colour per estimator label, the same in every plot of a problem."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    unique = list(dict.fromkeys(labels))
    return {label: palette[i % len(palette)] for i, label in enumerate(unique)}


def plain(text: str) -> str:
    """``text`` as matplotlib shows it literally: a "$" from a run file would start mathtext
    (and an unknown command in it, an error)."""
    return text.replace("$", r"\$")


def _curve_label(run: Run, show_lr: bool) -> str:
    label = f"{run.label}, lr {run.lr_text}" if show_lr else run.label
    return plain(label + " (diverged)" if run.diverged else label)


def _plot_curve(ax, x: np.ndarray, y: np.ndarray, run: Run, color, label: str | None) -> None:
    """One run's curve; non-finite points are dropped and a divergence ends in a cross."""
    ok = np.isfinite(x) & np.isfinite(y)
    ax.plot(x[ok], y[ok], color=color, linewidth=1.3, label=label)
    if run.diverged and ok.any():
        last = np.flatnonzero(ok)[-1]
        ax.plot(x[last], y[last], "x", color=color, markersize=10, markeredgewidth=2)


@functools.cache
def _plain_log_formatter() -> type:
    """Log-axis tick labels as plain numbers (2, 0.5, 1e-05), which read better than 2×10⁰;
    which ticks get a label is left to matplotlib's LogFormatter."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def __call__(self, x, pos=None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    return PlainLogFormatter


def _log_scale_if_positive(ax, values: Iterable[np.ndarray]) -> None:
    """Log y axis when there is positive data; non-positive points are masked, not clipped."""
    if any((np.isfinite(v) & (v > 0)).any() for v in values):
        ax.set_yscale("log", nonpositive="mask")
        formatter = _plain_log_formatter()
        ax.yaxis.set_major_formatter(formatter())
        ax.yaxis.set_minor_formatter(formatter(labelOnlyBase=False))


def _finish(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _plot_loss(ax, section: Section, x_column: str, colors: dict) -> None:
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


def _plot_accuracy(ax, section: Section, colors: dict) -> None:
    for run in section.runs:
        steps, accuracy = run.metrics["step"], run.metrics["test_accuracy"]
        ok = np.isfinite(steps) & np.isfinite(accuracy)
        label = _curve_label(run, section.show_lr)
        ax.plot(steps[ok], accuracy[ok], "o-", color=colors[run.label], markersize=3, label=label)
    chance = _chance_accuracy(section)
    if chance is not None:  # and an axis from 0 to 1, so that a flat curve looks flat
        ax.axhline(chance, color="gray", linestyle=":", linewidth=0.8, label="chance")
        ax.set_ylim(0, 1)
    ax.set_xlim(left=0)


def _chance_accuracy(section: Section) -> float | None:
    """1 / the number of classes of the section's data set, if the registry knows it."""
    from forwardgrad.experiments.datasets import DATASETS

    names = {run.config.get("dataset") for run in section.runs}
    spec = DATASETS.get(names.pop()) if len(names) == 1 else None
    return None if spec is None else 1 / spec.num_classes


def test_function_of(run: Run):
    """The run's test function, or None where it cannot be built (a problem this version does
    not know, a bad dim)."""
    try:
        return make_test_function(run.problem, run.dim)
    except ForwardGradError:
        return None


def evaluate_on_grid(fn, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
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
    values = evaluate_on_grid(test_function.fn, xs, ys)
    minimizer = np.asarray(test_function.minimizer, dtype=float).ravel()[:2]
    f_min = float(np.nanmin(values))
    # The test functions span many orders of magnitude: log-spaced levels above the minimum.
    shifted = values - f_min
    top = float(np.nanmax(shifted))
    if top > 0:
        positive = shifted[shifted > 0]
        bottom = max(float(positive.min()), top * 1e-7)
        levels = np.logspace(np.log10(bottom), np.log10(top), 25)
        from matplotlib.colors import LogNorm

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


def plot_trajectories(ax, section: Section, colors: dict, test_function) -> None:
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


def plot_problem(sections: list[Section], out_dir: Path, prefix: str) -> list[Path]:
    """All plots for one problem: one panel per section (same lr / own lr), one file per kind."""
    runs = [run for section in sections for run in section.runs]
    colors = _colors(run.label for run in runs)
    problem = runs[0].experiment
    written = []
    for kind, xlabel, ylabel, plot_panel in _plots(runs, colors):
        figure, axes = new_figure(len(sections))
        for ax, section in zip(axes, sections, strict=True):
            plot_panel(ax, section)
            _finish(ax, plain(f"{problem}: {section.title}"), xlabel, ylabel)
        written.append(_save(figure, out_dir / f"{prefix}{kind}.png"))
    return written


Panel = Callable[[object, Section], None]


def _plots(runs: list[Run], colors: dict) -> list[tuple[str, str, str, Panel]]:
    """The plots the runs have data for: (file name's kind, x label, y label, panel drawer)."""
    loss = "train loss (log scale)"
    steps, time = "iteration", "wall-clock training time (s)"
    plots: list[tuple[str, str, str, Panel]] = [
        ("loss_vs_steps", steps, loss, partial(_plot_loss, x_column="step", colors=colors)),
        ("loss_vs_time", time, loss, partial(_plot_loss, x_column="time_s", colors=colors)),
    ]
    if any(any_finite(run.metrics["test_accuracy"]) for run in runs):
        accuracy = partial(_plot_accuracy, colors=colors)
        plots.append(("test_accuracy", steps, "test accuracy", accuracy))
    two_d = [run for run in runs if run.is_test_function and run.dim == 2]
    if two_d and any(any_finite(run.metrics["x0"]) for run in two_d):
        function = test_function_of(two_d[0])
        trajectories = partial(plot_trajectories, colors=colors, test_function=function)
        plots.append(("trajectories", "x0", "x1", trajectories))
    gaps = {
        "fw_gap_exact": ("fw_gap", "Frank-Wolfe gap with the exact gradient (log scale)"),
        "fw_gap": ("fw_gap_steps", "Frank-Wolfe gap with each step's direction (log scale)"),
    }
    for column, (kind, ylabel) in gaps.items():
        if any(any_finite(run.metrics[column]) for run in runs):
            plots.append((kind, steps, ylabel, partial(_plot_gap, column=column, colors=colors)))
    if has_cosines(runs):
        panel = partial(_plot_cosines, colors=colors)
        plots.append(("cosine_vs_steps", steps, "cosine to its target gradient", panel))
    return plots


def _plot_cosines(ax, section: Section, colors: dict) -> None:
    plot_cosines(ax, section, colors, lambda run: _curve_label(run, section.show_lr))


def _plot_gap(ax, section: Section, column: str, colors: dict) -> None:
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
        ax.plot(steps[ok], trailing_mean(gap[ok]), color=color, linewidth=1.3, label=label)
    if column == "fw_gap":
        label = f"faint: logged gap; solid: mean of last {SMOOTHING_ROWS}"
        ax.plot([], [], color="gray", alpha=0.4, label=label)
    _log_scale_if_positive(ax, [run.metrics[column] for run in section.runs])
