"""Peak memory: each contender in a fresh subprocess. It builds the model and the batch, runs
one warm-up step (libraries, kernels), drops ``.grad`` and the contender, builds a fresh
contender, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) and reports the peak
RSS of one step above the resident size just before it. glibc is told to serve every allocation
above 64 KiB by mmap, so freed memory leaves the RSS at once."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from forwardgrad.bench.contenders import (
    BACKPROP,
    BACKPROP_KEPT,
    Contender,
    make_problem,
    make_step,
)
from forwardgrad.errors import ForwardGradError
from forwardgrad.experiments.files import atomic_write
from forwardgrad.experiments.memory import reset_high_water_mark, status_bytes


class ProbeFailed(ForwardGradError, RuntimeError):
    """A memory probe's subprocess failed; the message quotes its last line."""


_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def memory_probe(spec: dict) -> dict:
    """Run in a fresh process: peak RSS of one step of ``spec["contender"]`` above the
    resident size once model and batch exist (see the module docstring). Returns bytes."""
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    model, images, labels = make_problem(spec["model"], spec["batch"], spec.get("depth"))
    contender = Contender(**spec["contender"])
    problem = spec["model"]
    make_step(contender, model, images, labels, problem=problem)()  # warm-up, then forget it
    if contender.grads != "kept":
        for p in model.parameters():
            p.grad = None
    gc.collect()
    step = make_step(contender, model, images, labels, seed=1, problem=problem)
    gc.collect()
    resident = status_bytes("VmRSS")
    exact = reset_high_water_mark()
    step()
    peak = status_bytes("VmHWM")
    return {
        "resident_bytes": resident,
        "peak_bytes": peak,
        "above_bytes": max(peak - resident, 0),
        "method": "VmHWM after clear_refs" if exact else "VmHWM over the process's life",
    }


def _probe_main(spec_json: str, out_path: str) -> None:
    """Entry point of the probe subprocess: writes ``memory_probe``'s result as JSON."""
    atomic_write(out_path, json.dumps(memory_probe(json.loads(spec_json))))


def peak_memory(
    model_name: str,
    batch: int,
    contender: Contender,
    depth: int | None = None,
    threads: int | None = None,
    timeout_s: float = 600,
) -> dict:
    """``memory_probe`` of one contender, in a fresh Python process."""
    spec = {
        "model": model_name,
        "batch": batch,
        "depth": depth,
        "threads": threads,
        "contender": asdict(contender),
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "probe.json"
        call = f"_probe_main({json.dumps(spec)!r}, {str(out)!r})"
        code = f"from forwardgrad.bench.memory import _probe_main; {call}"
        env = {**os.environ, **_MALLOC_ENV}
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout_s
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ProbeFailed(f"the memory probe for {contender.key} failed: {last}")
        return json.loads(out.read_text())


def memory_table(
    problems: Sequence[tuple[str, int | None, int]],
    contenders: Sequence[Contender],
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Peak memory above resident of each contender on each (model, depth, batch) problem it
    applies to, as a ratio to the backprop step that treats ``.grad`` the same way
    (``Contender.grads``)."""
    references = {"fresh": BACKPROP, "kept": BACKPROP_KEPT}
    needed = [references[g] for g in dict.fromkeys(c.grads for c in contenders)]
    contenders = [*[r for r in needed if r not in contenders], *contenders]
    rows = []
    for model_name, depth, batch in problems:
        network, _, _ = make_problem(model_name, 1, depth)
        param_bytes = sum(p.numel() * p.element_size() for p in network.parameters())
        del network
        results = {}
        applicable = [c for c in contenders if c.applies_to(model_name)]
        for c in applicable:
            if progress:
                kept = ", .grad kept" if c.grads == "kept" else ""
                progress(f"memory: {model_name} depth={depth} batch={batch} {c.label}{kept}")
            results[c.key] = peak_memory(model_name, batch, c, depth, threads)
        for c in applicable:
            reference = results[references[c.grads].key]["above_bytes"]
            above = results[c.key]["above_bytes"]
            rows.append(
                {
                    "model": model_name,
                    "depth": depth,
                    "batch": batch,
                    "contender": c.key,
                    "label": c.label,
                    "grads": c.grads,
                    "param_bytes": param_bytes,
                    "above_resident_bytes": above,
                    "ratio_to_backprop": above / reference if reference else None,
                    "method": results[c.key]["method"],
                }
            )
    return rows
