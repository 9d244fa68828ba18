"""Benchmarks: the cost of a forward-gradient step against a backprop step, in time and memory.

Library code: every function returns results (plain dicts, JSON-ready) and prints nothing;
``forwardgrad bench`` and ``benchmarks/bench_fast_paths.py`` print and write them.

Method:

- Time per step (``timing``): one process, the same inputs for every contender, contenders
  alternated round by round (their order rotated each round), warm-up rounds first, then the
  median of the timed rounds. Each step is complete: estimate (or forward and backward) and the
  SGD update. Every median is also reported as a ratio to the backprop step of the same run.
  The local-learning contenders (``local``) are activity perturbation, end to end and on local
  losses, the forward gradient of local losses, local guesses and local backprop; those with
  local losses step on the problems cut into blocks (the MLPs and the CNN).
- Tangent sampling (``timing``): values per second of each distribution against torch's own
  samplers, alternated the same way, into one preallocated buffer.
- Peak memory (``memory``): each contender in a fresh subprocess, the peak RSS of one step above
  the resident size just before it.

Modules: ``contenders`` (problems and the steps compared), ``timing``, ``memory``, ``suite`` (the
whole benchmark), ``tables`` (Markdown and the result files) and ``flags`` (the command line).
"""

from forwardgrad.bench.contenders import (
    ACTIVITY,
    ACTIVITY_LOCAL,
    BACKPROP,
    BACKPROP_KEPT,
    FORWARD,
    LOCAL_BACKPROP,
    LOCAL_GUESS,
    ZEROTH_ORDER,
    Contender,
    deep_mlp,
    forward_gradient,
    forward_gradient_local,
    forward_sgd,
    kept,
    make_problem,
    make_step,
)
from forwardgrad.bench.flags import add_arguments, config_from_args
from forwardgrad.bench.memory import memory_probe, memory_table, peak_memory
from forwardgrad.bench.suite import BenchConfig, machine, run_benchmark
from forwardgrad.bench.tables import to_markdown, write_results
from forwardgrad.bench.timing import alternate, sampling_throughput, time_steps

__all__ = [
    "ACTIVITY",
    "ACTIVITY_LOCAL",
    "BACKPROP",
    "BACKPROP_KEPT",
    "FORWARD",
    "LOCAL_BACKPROP",
    "LOCAL_GUESS",
    "ZEROTH_ORDER",
    "BenchConfig",
    "Contender",
    "add_arguments",
    "alternate",
    "config_from_args",
    "deep_mlp",
    "forward_gradient",
    "forward_gradient_local",
    "forward_sgd",
    "kept",
    "machine",
    "make_problem",
    "make_step",
    "memory_probe",
    "memory_table",
    "peak_memory",
    "run_benchmark",
    "sampling_throughput",
    "time_steps",
    "to_markdown",
    "write_results",
]
