"""``report.md`` of one run and of a comparison, with their plots, from the logs alone."""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Sequence
from pathlib import Path

from forwardgrad.errors import ConfigurationError
from forwardgrad.experiments.files import atomic_write
from forwardgrad.experiments.labels import slug
from forwardgrad.experiments.schema import REPORT_FILE
from forwardgrad.reporting import markdown
from forwardgrad.reporting.claims import claim_lines
from forwardgrad.reporting.plots import plot_problem
from forwardgrad.reporting.runs import find_run_dirs, read_run
from forwardgrad.reporting.tables import (
    Section,
    frank_wolfe_lines,
    machine_line,
    reference_run,
    sections,
    settings_line,
    table,
)
from forwardgrad.reporting.thresholds import threshold_rule

# The runs of a comparison report in its order, so that `forwardgrad plot` redraws them alike.
RUN_ORDER_FILE = "report_runs.json"


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
    section = Section(
        title=f"lr {run.lr_text}", heading="", runs=[run], show_lr=False, threshold=None
    )
    images = plot_problem([section], run.path, prefix="")
    lines = [
        f"# {markdown.text(run.label)} on {markdown.text(run.experiment)}",
        "",
        settings_line([run]),
        "",
        machine_line([run]),
        "",
    ]
    lines += table(section, backprop=None, comparison=False)
    lines += frank_wolfe_lines(section)
    if run.diverged:
        lines += ["The loss became NaN or infinite: the run diverged; the curves stop there.", ""]
    lines += _image_lines(images, run.path)
    command = run.config.get("command")
    if command:
        rerun = shlex.join(str(part) for part in command) if isinstance(command, list) else command
        lines += ["To rerun:", "", *markdown.code_block(str(rerun)), ""]
    return atomic_write(run.path / REPORT_FILE, "\n".join(lines))


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
        raise ConfigurationError(
            "write_comparison_report needs at least one run directory; got none."
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [read_run(path) for path in run_dirs]
    problems = list(dict.fromkeys(run.experiment for run in runs))
    lines = [
        f"# {markdown.text(title or 'forwardgrad comparison: ' + ', '.join(problems))}",
        "",
        machine_line(runs),
        "",
        threshold_rule(runs),
        "",
    ]
    for problem in problems:
        lines += _problem_lines(problem, [run for run in runs if run.experiment == problem], out)
    # The order of the runs (rows, colours), for `forwardgrad plot` to draw them the same again.
    listed = [os.path.relpath(run.path.resolve(), out.resolve()) for run in runs]
    atomic_write(out / RUN_ORDER_FILE, json.dumps({"runs": listed}, indent=1))
    return atomic_write(out / REPORT_FILE, "\n".join(lines))


def _in_report_order(directory: Path, found: list[Path]) -> list[Path]:
    """``found`` (runs below ``directory``) in the order of the report written there, if any."""
    try:
        listed = json.loads((directory / RUN_ORDER_FILE).read_text())["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        return found
    rank = {(directory / name).resolve(): i for i, name in enumerate(listed)}
    return sorted(found, key=lambda path: rank.get(path.resolve(), len(rank)))


def _problem_lines(problem: str, problem_runs: list, out: Path) -> list[str]:
    """One problem's part of a comparison report: its sections' tables and claims, its plots."""
    problem_sections = sections(problem_runs)
    images = plot_problem(problem_sections, out, prefix=f"{slug(problem)}_")
    lines = [f"## {markdown.text(problem)}", "", settings_line(problem_runs), ""]
    for section in problem_sections:
        # Ratios use the backprop run of the same section; else any backprop run of the problem.
        backprop = reference_run(section.runs, "backprop") or reference_run(
            problem_runs, "backprop"
        )
        threshold = (
            "no run lowered its loss enough to set one"
            if section.threshold is None
            else f"{section.threshold:.4g}"
        )
        lines += [f"### {markdown.text(section.heading)}", "", f"Loss threshold: {threshold}.", ""]
        lines += table(section, backprop)
        if backprop is None:
            lines += ["No backprop run in this comparison, so no ratio to backprop.", ""]
        lines += frank_wolfe_lines(section)
        claims = claim_lines(problem_runs[0].problem, section, backprop)
        lines += claims + ([""] if claims else [])
    return lines + _image_lines(images, out)


def plot_runs(
    run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None
) -> list[Path]:
    """Redraw plots and reports from the logs (``forwardgrad plot RUN_DIR...``).

    Every run directory named gets its own report; several runs, or a comparison's ``--out``
    directory, get a comparison report, in ``out_dir`` (default: the comparison directory given,
    else the runs' common parent directory), with the runs in the order (and so the colours) of
    the report first written there.

    Args:
      run_dirs: run directories and/or directories holding run directories.
      out_dir: where the comparison report goes.

    Returns:
      The paths of every ``report.md`` written, the comparison's last.
    """
    if not run_dirs:
        raise ConfigurationError("plot_runs needs at least one run directory; got none.")
    runs = [run for path in run_dirs for run in _in_report_order(Path(path), find_run_dirs(path))]
    runs = list(dict.fromkeys(runs))
    # Each run's own report only where that run was named: a comparison's runs keep theirs.
    named = {Path(path).resolve() for path in run_dirs}
    written = [write_run_report(run) for run in runs if run.resolve() in named]
    given_one_comparison = len(run_dirs) == 1 and runs != [Path(run_dirs[0])]
    if len(runs) > 1 or given_one_comparison:
        if out_dir is None:
            out_dir = run_dirs[0] if given_one_comparison else _common_parent(runs)
        written.append(write_comparison_report(out_dir, runs))
    return written


def _common_parent(paths: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([path.resolve().parent for path in paths]))
