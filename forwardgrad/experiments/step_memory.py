"""Peak memory of one training step of each compared run, measured as ``forwardgrad bench``
measures it: in a fresh process, which builds the run's model and mini-batch, takes one warm-up
step, drops ``.grad`` and the estimator, builds them again, resets the kernel's peak-RSS counter
and reports the peak RSS of one step above the resident size just before it. The training loop's
own figure (growth of the peak over a whole run) mixes in whatever the process allocated before;
this one is the step alone. Below ``NOISE_FLOOR_BYTES`` a figure is page-allocator noise and
reports print n/a."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from forwardgrad.experiments.config import load_config
from forwardgrad.experiments.files import atomic_write
from forwardgrad.experiments.memory import reset_high_water_mark, status_bytes
from forwardgrad.experiments.tasks import make_task

NOISE_FLOOR_BYTES = 2**20
# glibc serves every allocation above 64 KiB by mmap, so freed memory leaves the RSS at once (as
# the benchmark's probes run).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
METHOD = "one step's peak RSS above resident, in a fresh process, .grad freed before it"


def probe_step(run_dir: str, download: bool = True) -> dict[str, Any]:
    """Run in a fresh process: peak RSS of one step of the run in ``run_dir`` above the
    resident size once model and batch exist (see the module docstring). Returns bytes."""
    from forwardgrad.experiments.step_timing import make_step  # imports the bench

    config = load_config(run_dir)
    torch.set_num_threads(config.threads or 1)
    task = make_task(config, download)
    torch.manual_seed(config.seed)
    model = task.make_model(config)
    make_step(config, task, model)()  # warm-up: libraries, kernels, the first-use check
    for parameter in model.parameters():
        parameter.grad = None
    gc.collect()
    step = make_step(config, task, model)
    gc.collect()
    resident = status_bytes("VmRSS")
    exact = reset_high_water_mark()
    step()
    peak = status_bytes("VmHWM")
    return {"above_bytes": max(peak - resident, 0), "exact": exact}


def _probe_main(run_dir: str, out_path: str, download: bool) -> None:
    """Entry point of the probe subprocess: writes ``probe_step``'s result as JSON."""
    atomic_write(out_path, json.dumps(probe_step(run_dir, download)))


def step_peak_bytes(run_dir: str | os.PathLike, download: bool = True, timeout_s: float = 600):
    """``probe_step`` of one run in a fresh Python process; None if the probe failed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "probe.json"
        call = f"_probe_main({str(run_dir)!r}, {str(out)!r}, {download!r})"
        code = f"from forwardgrad.experiments.step_memory import _probe_main; {call}"
        env = {**os.environ, **MALLOC_ENV}
        try:
            done = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            return None
        if done.returncode != 0 or not out.is_file():
            return None
        return json.loads(out.read_text())["above_bytes"]
