"""The paper's claims beside our measurements: the claims are listed in
``forwardgrad.experiments.paper``; here each one's measurement is taken from a section's runs."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from forwardgrad.experiments.paper import CLAIMS, FRANK_WOLFE_CLAIM, OWN_LR, SAME_LR, Claim
from forwardgrad.experiments.step_memory import NOISE_FLOOR_BYTES
from forwardgrad.reporting import markdown
from forwardgrad.reporting.runs import Run, format_number
from forwardgrad.reporting.tables import (
    Section,
    final_exact_gap,
    final_train_loss,
    ratio,
    reference_run,
)
from forwardgrad.reporting.thresholds import time_to_threshold
from forwardgrad.reporting.timing import alternated_ratio, alternated_step_s, peak_memory


@dataclass(frozen=True)
class _Pair:
    """The forward and backprop runs a section's claims compare, and its threshold."""

    forward: Run | None
    backprop: Run | None
    threshold: float | None

    @property
    def complete(self) -> bool:
        return self.forward is not None and self.backprop is not None


def _ours_ratio(numerator: float, denominator: float) -> str:
    return format_number(ratio(numerator, denominator), ".2f", missing="n/a")


def _step_time_ratio(pair: _Pair) -> str:
    alternated = alternated_ratio(pair.forward, pair.backprop)
    if alternated is not None:  # the same load for both (see the note under the table)
        return f"{alternated['median']:.2f} ({alternated['p10']:.2f}–{alternated['p90']:.2f})"
    return _ours_ratio(pair.forward.median_step_time_s, pair.backprop.median_step_time_s)


def _threshold_time_ratio(pair: _Pair) -> str:
    reached_f = time_to_threshold(pair.forward, pair.threshold)
    reached_b = time_to_threshold(pair.backprop, pair.threshold)
    if not (reached_f and reached_b):
        return "n/a (not both reached the threshold)"
    step_f, step_b = alternated_step_s(pair.forward), alternated_step_s(pair.backprop)
    if step_f > 0 and step_b > 0:  # steps × alternated step time: the same load for both
        return _ours_ratio(reached_b[0] * step_b, reached_f[0] * step_f)
    return _ours_ratio(reached_b[1], reached_f[1])


def _peak_memory_ratio(pair: _Pair) -> str:
    forward, backprop = peak_memory(pair.forward)[0], peak_memory(pair.backprop)[0]
    if not (math.isfinite(forward) and math.isfinite(backprop)):
        return f"n/a (below the {NOISE_FLOOR_BYTES / 2**20:g} MiB noise floor)"
    return _ours_ratio(forward, backprop)


def _accuracy_at_same_lr(pair: _Pair) -> str:
    forward, backprop = pair.forward, pair.backprop
    return (
        f"{format_number(forward.final_test_accuracy, '.3f')} vs "
        f"{format_number(backprop.final_test_accuracy, '.3f')} (batch "
        f"{forward.config.get('batch_size')}, lr {format_number(forward.lr, '.3g')}, "
        f"{forward.steps} steps)"
    )


def _accuracies(pair: _Pair) -> str:
    return (
        f"test accuracy {format_number(pair.forward.final_test_accuracy, '.3f')} (forward) vs "
        f"{format_number(pair.backprop.final_test_accuracy, '.3f')} (backprop)"
    )


# Each measure gives the "this comparison" cell of a claim from a forward and a backprop run.
MEASURES: dict[str, Callable[[_Pair], str]] = {
    "step_time_ratio": _step_time_ratio,
    "threshold_time_ratio": _threshold_time_ratio,
    "peak_memory_ratio": _peak_memory_ratio,
    "accuracy_at_same_lr": _accuracy_at_same_lr,
    "accuracies": _accuracies,
}
# Without a threshold (no run lowered its loss enough) there is no claim about reaching it.
_NEEDS_THRESHOLD = {"threshold_time_ratio"}


def claim_lines(problem: str, section: Section, backprop: Run | None) -> list[str]:
    """The table of the paper's claims that apply to this section, beside our numbers."""
    if any(run.is_frank_wolfe for run in section.runs):  # the SGD claims do not apply
        return frank_wolfe_claim_lines(section)
    pair = _Pair(reference_run(section.runs, "forward"), backprop, section.threshold)
    policy = OWN_LR if section.show_lr else SAME_LR
    rows = []
    for claim in CLAIMS:
        if not claim.applies(problem, policy):
            continue
        if claim.measure in _NEEDS_THRESHOLD and pair.threshold is None:
            continue
        ours = MEASURES[claim.measure](pair) if pair.complete else "n/a"
        rows.append((claim.quantity, claim.source, ours))
    if not rows:
        return []
    which = f"forward = {markdown.text(pair.forward.label)}" if pair.forward else "no forward run"
    lines = [
        f"Paper's claims beside ours ({which}; ratios of our own measurements in this section):",
        "",
        "| quantity | paper or other source | this comparison |",
        "|---|---|---|",
    ]
    return lines + [f"| {a} | {b} | {c} |" for a, b, c in rows]


def _at_end(run: Run | None) -> str:
    if run is None:
        return "no run"
    text = (
        f"exact gap {format_number(final_exact_gap(run))}, "
        f"train loss {format_number(final_train_loss(run))}"
    )
    if not run.is_test_function:
        text += f", test accuracy {format_number(run.final_test_accuracy, '.3f')}"
    return text


def frank_wolfe_claim_lines(section: Section, claim: Claim = FRANK_WOLFE_CLAIM) -> list[str]:
    """Rostami & Kia (2024) beside our averaged and raw forward-gradient and backprop runs."""

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
    ours = f"averaged: {_at_end(averaged)}; raw: {_at_end(raw)}"
    if backprop:
        ours += f"; backprop ({markdown.text(backprop.label)}): {_at_end(backprop)}"
    return [
        "Paper's claim beside ours (at the end of each run):",
        "",
        "| quantity | paper | this comparison |",
        "|---|---|---|",
        f"| {claim.quantity} | {claim.source} | {ours} |",
    ]
