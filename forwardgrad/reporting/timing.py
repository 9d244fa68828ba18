"""Time ratios in reports: from the alternated step timing of a comparison
(``forwardgrad.experiments.step_timing``) where it exists, else from the runs' own medians, with
a note that says which and whether the machine was loaded."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forwardgrad.experiments.step_memory import METHOD, NOISE_FLOOR_BYTES
from forwardgrad.experiments.step_timing import (
    LOADED_CPU_SHARE,
    STEP_TIMING_FILE,
    is_loaded,
    is_noisy,
)
from forwardgrad.reporting import markdown
from forwardgrad.reporting.runs import Run, format_number


def read_step_timing(directory: Path) -> dict[str, Any] | None:
    """``step_timing.json`` of a comparison directory; None if absent or unreadable."""
    path = directory / STEP_TIMING_FILE
    try:
        timing = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return timing if isinstance(timing, dict) and isinstance(timing.get("runs"), dict) else None


def alternated(run: Run) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(the comparison's step timing, this run's entry in it), if the run was timed."""
    timing = read_step_timing(run.path.parent)
    entry = None if timing is None else timing["runs"].get(run.path.name)
    return None if entry is None else (timing, entry)


def alternated_ratio(run: Run, backprop: Run | None) -> dict[str, float] | None:
    """The per-round wall-time ratios of ``run``'s step to ``backprop``'s (median, p10, p90,
    cpu), when both were alternated in the same timing."""
    found = alternated(run)
    if found is None or backprop is None or backprop.path.parent != run.path.parent:
        return None
    return found[1].get("ratio_to", {}).get(backprop.path.name)


def alternated_step_s(run: Run) -> float:
    """The median wall time of ``run``'s alternated step; NaN if it was not timed."""
    found = alternated(run)
    return math.nan if found is None else float(found[1]["wall_s"]["median"])


def ratio_cell(run: Run, backprop: Run | None, fallback: float) -> str:
    """ "2.95 (2.80–3.10)": the alternated ratio with its 10th–90th percentiles; else the ratio
    of the runs' own medians."""
    ratio = alternated_ratio(run, backprop)
    if ratio is None:
        return format_number(fallback, ".2f", missing="n/a")
    text = f"{ratio['median']:.2f} ({ratio['p10']:.2f}–{ratio['p90']:.2f})"
    return text + (" noisy" if is_noisy(ratio) else "")


def timing_note(runs: Sequence[Run], backprop: Run | None) -> list[str]:
    """How the section's time ratios were measured and whether the machine was loaded."""
    if backprop is None:
        return []
    timed = [alternated(run) for run in runs]
    if not all(timed) or any(alternated_ratio(r, backprop) is None for r in runs):
        return [
            "Time ÷ backprop: ratio of the runs' own median step times, taken at different "
            "moments; on a busy machine it measures the load as much as the estimators.",
            "",
        ]
    timing = timed[0][0]
    share = float(timing["cpu_share"])
    lines = [
        f"Time ÷ backprop: {timing['rounds']} rounds of single steps of every run alternated "
        f"in one process after training ({timing['threads']} thread(s)), so load hits every "
        "estimator alike; median of the per-round ratios, 10th–90th percentile in brackets "
        "(noisy: that band is wider than half the median). Time to threshold: steps to "
        "threshold × the run's median alternated step time.",
    ]
    cpu = ", ".join(
        f"{markdown.text(run.label)} {alternated_ratio(run, backprop)['cpu']:.2f}" for run in runs
    )
    lines.append(f"CPU-time ratios to backprop (median CPU time per step): {cpu}.")
    if is_loaded(timing):
        lines.append(
            f"**The machine was loaded**: the stepping thread had the CPU {share:.0%} of the "
            f"time (below {LOADED_CPU_SHARE:.0%}). Every step is slowed, so the ratios hold "
            "but absolute times and the runs' own medians are inflated; the CPU-time ratios "
            "are the steadier figure."
        )
    else:
        lines.append(
            f"Machine not loaded while timing: the stepping thread had the CPU {share:.0%} of "
            "the time."
        )
    return [lines[0], "", " ".join(lines[1:]), ""]


def peak_memory(run: Run) -> tuple[float, str]:
    """(bytes, method): one step's peak measured in a fresh process where it was, else the
    run's own figure; NaN below ``NOISE_FLOOR_BYTES``, where it is noise."""
    found = alternated(run)
    probed = None if found is None else found[1].get("step_peak_bytes")
    peak, method = (float(probed), METHOD) if probed is not None else run.peak_memory
    return (peak if peak >= NOISE_FLOOR_BYTES else math.nan), method


def format_memory(run: Run) -> str:
    peak, _ = peak_memory(run)
    if math.isfinite(peak):
        return f"{peak / 2**20:.1f} MiB"
    return "n/a" if math.isfinite(run.peak_memory[0]) or alternated(run) else "—"


def memory_note(runs: Sequence[Run]) -> list[str]:
    """How peak memory was measured, said once under the table (the method names are long)."""
    methods = {
        markdown.text(run.label): markdown.text(peak_memory(run)[1])
        for run in runs
        if peak_memory(run)[1]
    }
    if not methods:
        return []
    floor = f"n/a: below {NOISE_FLOOR_BYTES / 2**20:g} MiB, where the figure is noise"
    if len(set(methods.values())) == 1:
        return [f"Peak memory: {next(iter(methods.values()))}; {floor}.", ""]
    listed = "; ".join(f"{k}: {v}" for k, v in methods.items())
    return [f"Peak memory: {listed}; {floor}.", ""]
