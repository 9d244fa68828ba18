"""The benchmark's results as Markdown tables, and the files ``bench.json`` and ``bench.md``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from forwardgrad.bench.contenders import BACKPROP
from forwardgrad.experiments.files import atomic_write


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _grouped(rows: Sequence[dict], keys: Sequence[str]) -> dict[tuple, dict[str, dict]]:
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), {})[row["contender"]] = row
    return groups


def _labels(rows: Sequence[dict]) -> dict[str, str]:
    return {row["contender"]: row["label"] for row in rows}


def to_markdown(results: dict) -> str:
    """The results as Markdown tables, with the machine that produced them."""
    m = results["machine"]
    parts = [
        f"Measured {results['started']} on {m['cpu']} ({m['cores']} cores, "
        f"{m['torch_threads']} torch threads), torch {m['torch']}, Python {m['python']}; "
        f"load average {_load(m['load_average'])} before, "
        f"{_load(results.get('load_average_after'))} after."
    ]
    if results["timing"]:
        labels = _labels(results["timing"])
        header = ["model", "batch", "backprop step"] + [
            labels[k] for k in labels if k != BACKPROP.key
        ]
        rows = []
        for (model, batch), cells in _grouped(results["timing"], ["model", "batch"]).items():
            bp = cells[BACKPROP.key]
            row = [model, str(batch), f"{bp['median_ms']:.1f} ms (n={bp['steps']})"]
            row += [
                f"{cells[k]['ratio_to_backprop']:.2f}x" if k in cells else "-"
                for k in labels
                if k != BACKPROP.key
            ]
            rows.append(row)
        parts.append(
            "Time per training step (estimate + SGD update), median, as a ratio to the backprop "
            "step of the same run:\n\n" + _table(header, rows)
        )
    if results["sampling"]:
        base = {r["method"]: r["values_per_s"] for r in results["sampling"]}
        rows = [
            [
                r["method"],
                f"{r['values_per_s'] / 1e9:.3f}",
                f"{r['values_per_s'] / base.get('torch normal_', r['values_per_s']):.2f}x",
            ]
            for r in results["sampling"]
        ]
        size = results["sampling"][0]["values"]
        parts.append(
            f"Tangent sampling into a buffer of {size:,} values (median):\n\n"
            + _table(["sampler", "1e9 values/s", "vs torch normal_"], rows)
        )
    regimes = {
        "fresh": "`.grad` freed before the step (as `optimizer.zero_grad()` does), so the step "
        "allocates it",
        "kept": "`.grad` kept from the last step (as `zero_grad(set_to_none=False)` keeps it); "
        "backprop is `zero_grad(set_to_none=False)`, `loss.backward()`, `step()`",
    }
    for regime, says in regimes.items():
        memory = [r for r in results["memory"] if r.get("grads", "fresh") == regime]
        if memory:
            parts.append(_memory_markdown(memory, says))
    return "\n\n".join(parts) + "\n"


def _memory_markdown(memory: Sequence[dict], regime: str) -> str:
    labels = _labels(memory)
    header = ["model", "batch", "parameters"] + list(labels.values())
    rows = []
    for (model, depth, batch), cells in _grouped(memory, ["model", "depth", "batch"]).items():
        name = f"{model} depth {depth}" if depth else model
        params = next(iter(cells.values()))["param_bytes"]
        row = [name, str(batch), _megabytes(params)]
        for k in labels:
            cell = cells.get(k)
            if cell is None:
                row.append("-")
                continue
            ratio = cell["ratio_to_backprop"]
            text = _megabytes(cell["above_resident_bytes"])
            row.append(text if ratio is None else f"{text} ({ratio:.2f}x)")
        rows.append(row)
    return (
        "Peak memory of one step above the resident size once model and batch exist, each "
        f"contender in a fresh process ({memory[0]['method']}), {regime}; ratio to backprop:"
        "\n\n" + _table(header, rows)
    )


def _megabytes(count: float) -> str:
    return f"{count / 2**20:.0f} MiB" if count >= 2**20 else f"{count / 2**10:.0f} KiB"


def _load(load: Sequence[float] | None) -> str:
    return "unknown" if not load else "/".join(f"{x:.1f}" for x in load)


def write_results(results: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``bench.json`` and ``bench.md`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = atomic_write(out / "bench.json", json.dumps(results, indent=2) + "\n")
    md_path = atomic_write(out / "bench.md", to_markdown(results))
    return json_path, md_path
