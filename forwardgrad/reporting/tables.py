"""The tables of a report: runs grouped into sections, one row per run, and the lines that say
how the numbers were measured."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from forwardgrad.reporting import markdown
from forwardgrad.reporting.cosines import COSINE_HEADER, cosine_note, has_cosines, mean_cosine
from forwardgrad.reporting.runs import Run, format_number, last_finite
from forwardgrad.reporting.thresholds import (
    SMOOTHING_ROWS,
    loss_threshold,
    smoothed_train_loss,
    time_to_threshold,
)
from forwardgrad.reporting.timing import (
    alternated_step_s,
    format_memory,
    memory_note,
    ratio_cell,
    timing_note,
)

TIMING_NOTE = (
    "Timings were measured on this machine{machine}. Wall-clock time counts training only: "
    "evaluation, logging and checkpointing are excluded."
)


@dataclass
class Section:
    """The runs of one problem compared under one learning-rate policy."""

    title: str
    heading: str
    runs: list[Run]
    show_lr: bool
    threshold: float | None


def sections(runs: list[Run]) -> list[Section]:
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
        sections.append(Section(title, heading, fixed, len(lrs) > 1, loss_threshold(fixed)))
    if swept:
        heading = "Each estimator at its own learning rate (chosen by a sweep on a held-out split)"
        sections.append(Section("own lr (sweep)", heading, swept, True, loss_threshold(swept)))
    return sections


def reference_run(runs: Sequence[Run], estimator: str) -> Run | None:
    """The run of that estimator to compare against: single-tangent first, as in the paper,
    and among those the plain one (dense tangents, no local losses or guesses)."""
    candidates = [run for run in runs if run.estimator == estimator]
    single = [run for run in candidates if int(run.config.get("tangents") or 1) == 1]
    plain = [run for run in single if not any(run.config.get(k) for k in _REFINEMENTS)]
    return (plain or single or candidates or [None])[0]


# Settings that make a run other than the paper's estimator (structured tangents, local losses).
_REFINEMENTS = ("tangent_rank", "local_losses", "guess")


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator where both are measured; else NaN."""
    # A zero time or memory means "not measured" (e.g. time_s all zero), not "infinitely fast".
    if (
        math.isfinite(numerator)
        and math.isfinite(denominator)
        and numerator > 0
        and denominator > 0
    ):
        return numerator / denominator
    return math.nan


def format_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "—"
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def table(section: Section, backprop: Run | None, comparison: bool = True) -> list[str]:
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
    cosines = has_cosines(runs)
    if cosines:
        header += [COSINE_HEADER]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = _cells(run, backprop, test_function, comparison)
        if comparison:
            cells[-1:-1] = _threshold_cells(run, section.threshold)
        if distributed:
            sent = run.bytes_communicated_per_step
            cells.append("n/a" if sent is None else f"{int(sent):,}")
        if cosines:
            cells.append(mean_cosine(run))
        lines.append("| " + " | ".join(markdown.text(cell) for cell in cells) + " |")
    notes = timing_note(runs, backprop) if comparison else []
    return lines + [""] + notes + memory_note(runs) + cosine_note(runs)


def _cells(run: Run, backprop: Run | None, test_function: bool, comparison: bool) -> list[str]:
    """A run's cells up to peak memory, without the threshold's."""
    time_ratio = (
        math.nan if backprop is None else ratio(run.median_step_time_s, backprop.median_step_time_s)
    )
    if run.diverged:
        row = run.last_finite_row
        at = "" if row is None else f" after step {int(run.metrics['step'][row])}"
        final_loss = f"diverged{at}"
    else:
        final_loss = format_number(final_train_loss(run))
    if test_function:
        last = format_number(run.final_distance_to_optimum, ".4g")
    else:
        last = format_number(run.final_test_accuracy, ".3f")
    return [
        run.label + (" ⚠ diverged" if run.diverged else ""),
        run.lr_text,
        run.lr_selected_by,
        str(run.steps),
        format_time(run.median_step_time_s),
        *([ratio_cell(run, backprop, time_ratio)] if comparison else []),
        final_loss,
        last,
        format_memory(run),
    ]


def final_train_loss(run: Run) -> float:
    """The mean of the last ``SMOOTHING_ROWS`` logged train losses (test functions: the last
    value): one mini-batch's loss is too noisy to compare runs by."""
    smoothed = smoothed_train_loss(run)
    if len(smoothed) and math.isfinite(smoothed[-1]):
        return float(smoothed[-1])
    return run.final_train_loss


def _threshold_cells(run: Run, threshold: float | None) -> list[str]:
    reached = None if threshold is None else time_to_threshold(run, threshold)
    if reached is None:
        return ["not reached", "not reached"]
    step_s = alternated_step_s(run)  # the same load for every run, where it was measured
    seconds = reached[0] * step_s if math.isfinite(step_s) else reached[1]
    return [str(reached[0]), f"{seconds:.3g} s"]


def final_exact_gap(run: Run) -> float:
    return last_finite(run.metrics["fw_gap_exact"])


def frank_wolfe_lines(section: Section) -> list[str]:
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
            markdown.text(run.label),
            format_number(exact[0] if len(exact) else math.nan),
            format_number(exact.min() if len(exact) else math.nan),
            format_number(final_exact_gap(run)),
            format_number(float(per_step.mean()) if len(per_step) else math.nan),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def machine_line(runs: Sequence[Run]) -> str:
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
    parts = [markdown.text(p) for p in parts if p]
    return TIMING_NOTE.format(machine=f" ({', '.join(parts)})" if parts else "")


def settings_line(runs: Sequence[Run]) -> str:
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
        if key == "test_examples" and not any(run.is_test_function for run in runs):
            # Evaluation subsets differ between problems (e.g. 2000 images, 500 for the CNN).
            count = runs[0].config.get(key)
            same = len(values) == 1
            parts.append(
                f"test examples {count if count else 'all (the whole test set)'}"
                if same
                else "test examples differ between runs"
            )
        elif len(values) == 1 and runs[0].config.get(key) is not None:
            parts.append(f"{key.replace('_', ' ')} {markdown.text(runs[0].config[key])}")
    line = "Settings: " + (", ".join(parts) if parts else "not recorded") + "."
    if any(run.config.get("local_losses") for run in runs):
        line += (
            " Runs with local losses log as train loss the sum of their blocks' local losses "
            "(with local guesses, the model's own loss); test loss and accuracy are the "
            "model's own."
        )
    return line
