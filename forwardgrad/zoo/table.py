"""The zoo's state table: per model, its forward time, exactness, path and step-time ratio."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from forwardgrad.zoo import diagnostics, harness
from forwardgrad.zoo.registry import CASES, ZooCase

DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class Row:
    """One model's line. Relative errors are the worse of train and eval mode (NaN: the step
    failed, ``error`` says how); ``timing`` is ``None`` when the step could not be timed.
    ``path`` is the timed step's (float32, train mode); ``general_in`` names the exactness checks
    (dtype and mode) that took the general path, with the first one's reason."""

    case: ZooCase
    parameters: int
    errors: dict[torch.dtype, float]
    timing: harness.Timing | None
    path: harness.PathInfo
    error: str | None
    general_in: tuple[list[str], str | None] = ([], None)


def measure(case: ZooCase, size: str = "bench", rounds: int = 7) -> Row:
    """Exactness in float32 and float64, train and eval mode, and the step timing of ``case``."""
    checks = [
        harness.check_exactness(case, size, d, train) for d in DTYPES for train in (True, False)
    ]
    errors = {d: max(c.relative_error for c in checks if c.dtype == d) for d in DTYPES}
    failed = [c.error for c in checks if c.error]
    parameters = sum(p.numel() for p in case.instantiate(size).model.parameters())
    timing, error = None, failed[0] if failed else None
    try:
        timing = harness.time_steps(case, size, rounds=rounds)
    except Exception as caught:  # reported in the table
        error = error or diagnostics.one_line(caught)
    path = timing.path if timing is not None else checks[0].path
    general = [c for c in checks if c.path.path == "general"]
    where = [
        f"{str(c.dtype).removeprefix('torch.')} {'train' if c.train else 'eval'}" for c in general
    ]
    general_in = (where, general[0].path.fallback if general else None)
    return Row(case, parameters, errors, timing, path, error, general_in)


def state_table(
    names: Iterable[str] | None = None,
    size: str = "bench",
    rounds: int = 7,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Measure every case in ``names`` (default: all that can be built here)."""
    rows = []
    for name in names if names is not None else CASES:
        case = CASES[name]
        if case.unavailable() is not None:
            continue
        if progress is not None:
            progress(name)
        rows.append(measure(case, size, rounds))
    return rows


def _error_cell(value: float) -> str:
    return "fails" if math.isnan(value) else f"{value:.1e}"


def format_table(rows: list[Row]) -> str:
    """A Markdown table, then a line on the error measure, the fast-path share and the median
    ratio."""
    lines = [
        "| model | family | params | forward ms | rel. err f32 | rel. err f64 | path "
        "| fallback (first op) | FG/BP step [q1, q3] | rank-1 FG/BP [q1, q3] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        t = row.timing
        forward = f"{1e3 * t.forward:.1f}" if t else "-"
        ratio = f"{t.ratio:.2f} [{t.ratio_low:.2f}, {t.ratio_high:.2f}]" if t else "-"
        rank1 = f"{t.rank1_ratio:.2f} [{t.rank1_low:.2f}, {t.rank1_high:.2f}]" if t else "-"
        fallback = row.path.fallback or ""
        where, reason = row.general_in
        if row.path.path == "fast" and where:
            fallback = f"general in {', '.join(where)}: {reason}"
        if row.error:
            error = row.error if len(row.error) <= 100 else row.error[:97] + "..."
            fallback = f"{fallback}; error: {error}" if fallback else f"error: {error}"
        f32, f64 = (_error_cell(row.errors[d]) for d in DTYPES)
        lines.append(
            f"| {row.case.name} | {row.case.family} | {row.parameters / 1e6:.2f}M | {forward} "
            f"| {f32} | {f64} "
            f"| {row.path.path or '?'} | {fallback.replace('|', '/')} | {ratio} | {rank1} |"
        )
    ratios = [r.timing.ratio for r in rows if r.timing]
    rank1 = [r.timing.rank1_ratio for r in rows if r.timing]
    fast = sum(r.path.path == "fast" for r in rows)
    summary = (
        "rel. err: |d - d_exact| / |grad L| of one K = 1 Rademacher step, the worse of train and "
        f"eval mode. Fast path: {fast} of {len(rows)} models"
    )
    if ratios:
        summary += (
            f"; median FG/BP step ratio {statistics.median(ratios):.2f} dense, "
            f"{statistics.median(rank1):.2f} with rank-1 tangents, over {len(ratios)}"
        )
    return "\n".join(lines + ["", summary])
