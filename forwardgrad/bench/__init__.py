"""Benchmarks: the cost of a forward-gradient step against a backprop step, in time and memory.

Library code: every function returns results (plain dicts, JSON-ready) and prints nothing;
``forwardgrad bench`` and ``benchmarks/bench_fast_paths.py`` print and write them.

Method (issue 4):

- Time per step: one process, the same inputs for every contender, contenders alternated
  round by round (their order rotated each round), warm-up rounds first, then the median of
  the timed rounds. Each step is complete: estimate (or forward and backward) and the SGD
  update. Every median is also reported as a ratio to the backprop step of the same run.
- Tangent sampling: values per second of each distribution against torch's own samplers,
  alternated the same way, into one preallocated buffer.
- Peak memory: each contender in a fresh subprocess. It builds the model and the batch, runs
  one warm-up step (libraries, kernels), drops ``.grad`` and the contender, builds a fresh
  contender, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) and reports the
  peak RSS of one step above the resident size just before it. glibc is told to serve every
  allocation above 64 KiB by mmap, so freed memory leaves the RSS at once.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from forwardgrad import tangents as tg
from forwardgrad.errors import ConfigurationError
from forwardgrad.estimators import Backprop, ForwardGradient, ZerothOrder
from forwardgrad.optim.forward_sgd import ForwardSGD

# ---------------------------------------------------------------------------------------------
# Problems and contenders


def deep_mlp(depth: int, width: int = 1024, num_classes: int = 10) -> nn.Sequential:
    """784 -> width (depth hidden layers, ReLU after each) -> classes."""
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(28 * 28, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def make_problem(
    model: str, batch: int, depth: int | None = None, width: int = 1024, seed: int = 0
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A model of ``forwardgrad.experiments.problems`` (logreg, mlp, cnn) or ``deep-mlp`` of
    ``depth`` hidden layers, with one random MNIST-shaped batch: (model, images, labels)."""
    torch.manual_seed(seed)
    if model == "deep-mlp":
        if depth is None:
            raise ValueError("deep-mlp needs a depth (number of hidden layers), e.g. depth=4.")
        network = deep_mlp(depth, width)
    else:
        from forwardgrad.experiments.problems import make_model

        network = make_model(model)
    generator = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(batch, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    return network, images, labels


@dataclass(frozen=True)
class Contender:
    """One way to take a training step; ``key`` names it in JSON, ``label`` in tables."""

    key: str
    label: str
    estimator: str  # forward, backprop, forward-gradient, forward-sgd, zeroth-order
    tangents: int = 1
    distribution: str = "normal"
    # Memory only: "fresh", .grad freed before the step as optimizer.zero_grad() does; "kept",
    # the buffers of the last step reused, as with zero_grad(set_to_none=False).
    grads: str = "fresh"


FORWARD = Contender("forward", "forward only", "forward")
BACKPROP = Contender("backprop", "backprop", "backprop")
# The usual loop on kept buffers: zero_grad(set_to_none=False), loss.backward(), step().
BACKPROP_KEPT = Contender("backprop:kept", "backprop", "backprop", grads="kept")


def kept(contender: Contender) -> Contender:
    """``contender`` stepping on the ``.grad`` buffers of its last step."""
    return Contender(**{**asdict(contender), "key": contender.key + ":kept", "grads": "kept"})


def forward_gradient(tangents: int, distribution: str = "normal") -> Contender:
    return Contender(
        f"forward-gradient:{distribution}:{tangents}",
        f"FG K={tangents} {distribution}",
        "forward-gradient",
        tangents,
        distribution,
    )


def forward_sgd(distribution: str = "normal") -> Contender:
    return Contender(
        f"forward-sgd:{distribution}", f"ForwardSGD {distribution}", "forward-sgd", 1, distribution
    )


ZEROTH_ORDER = Contender("zeroth-order", "zeroth-order", "zeroth-order")


def make_step(
    contender: Contender,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: float = 1e-4,
    seed: int = 0,
) -> Callable[[], None]:
    """One full training step of ``contender`` on ``model`` (estimate and SGD update)."""

    def closure() -> torch.Tensor:
        return F.cross_entropy(model(images), labels)

    kind = contender.estimator
    if kind == "forward":

        def step() -> None:
            with torch.no_grad():
                closure()

        return step
    if kind == "forward-sgd":
        sgd = ForwardSGD(model, lr, contender.tangents, contender.distribution, seed=seed)
        return lambda: sgd.step(closure)
    if kind == "backprop" and contender.grads == "kept":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)

        def step() -> None:
            optimizer.zero_grad(set_to_none=False)
            closure().backward()
            optimizer.step()

        return step
    if kind == "backprop":
        estimator = Backprop()
    elif kind == "forward-gradient":
        estimator = ForwardGradient(contender.tangents, contender.distribution, seed=seed)
    elif kind == "zeroth-order":
        estimator = ZerothOrder(contender.tangents, seed=seed)
    else:
        raise ValueError(f"unknown contender kind {kind!r}.")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def step() -> None:
        estimator.estimate(model, closure)
        optimizer.step()

    return step


# ---------------------------------------------------------------------------------------------
# Timing


def alternate(
    steps: dict[str, Callable[[], None]],
    rounds: int,
    warmup: int = 2,
    budget_s: float | None = None,
    min_rounds: int = 3,
) -> dict[str, list[float]]:
    """Time each callable once per round, in an order rotated every round; returns seconds.

    ``warmup`` rounds are run and discarded first. With ``budget_s``, timing stops after the
    round that exceeds it, once ``min_rounds`` rounds have been timed.
    """
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for index in range(warmup + rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            begin = time.perf_counter()
            steps[name]()
            elapsed = time.perf_counter() - begin
            if index >= warmup:
                times[name].append(elapsed)
        timed = index + 1 - warmup
        over = budget_s is not None and time.perf_counter() - started > budget_s
        if timed >= min_rounds and over:
            break
    return times


def time_steps(
    model_name: str,
    batch: int,
    contenders: Sequence[Contender],
    rounds: int = 20,
    warmup: int = 2,
    budget_s: float | None = None,
) -> list[dict]:
    """Median step time of each contender on one problem, and its ratio to backprop's.

    Every contender trains its own copy of the model on the same batch.
    """
    if BACKPROP not in contenders:
        contenders = [BACKPROP, *contenders]
    model, images, labels = make_problem(model_name, batch)
    steps = {
        c.key: make_step(c, copy.deepcopy(model), images, labels, seed=i)
        for i, c in enumerate(contenders)
    }
    gc.collect()
    times = alternate(steps, rounds, warmup, budget_s)
    reference = statistics.median(times[BACKPROP.key])
    rows = []
    for c in contenders:
        median = statistics.median(times[c.key])
        rows.append(
            {
                "model": model_name,
                "batch": batch,
                "contender": c.key,
                "label": c.label,
                "steps": len(times[c.key]),
                "median_ms": 1e3 * median,
                "ratio_to_backprop": median / reference,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Tangent sampling


def sampling_throughput(size: int = 1_863_690, rounds: int = 20, warmup: int = 2) -> list[dict]:
    """Values per second of this package's samplers and of torch's, into one buffer of ``size``.

    ``size`` defaults to the parameter count of the paper's MLP. The Rademacher baselines are
    the usual ways of drawing signs with torch: ``bernoulli_`` and ``randint``.
    """
    buffer = torch.empty(size)
    generator = torch.Generator().manual_seed(0)
    seeds = iter(range(10**9))
    methods: dict[str, Callable[[], None]] = {
        "forwardgrad normal": lambda: tg.fill_tangent(buffer, "normal", next(seeds), 0, 0),
        "torch normal_": lambda: buffer.normal_(generator=generator),
        "forwardgrad rademacher": lambda: tg.fill_tangent(buffer, "rademacher", next(seeds), 0, 0),
        "torch bernoulli_ signs": lambda: (
            buffer.bernoulli_(0.5, generator=generator).mul_(2).sub_(1)
        ),
        "torch randint signs": lambda: buffer.copy_(
            torch.randint(0, 2, (size,), generator=generator).mul_(2).sub_(1)
        ),
    }
    times = alternate(methods, rounds, warmup)
    rows = []
    for name, seconds in times.items():
        median = statistics.median(seconds)
        rows.append(
            {
                "method": name,
                "values": size,
                "median_ms": 1e3 * median,
                "values_per_s": size / median,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Peak memory, each contender in a fresh process

_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field_name}")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def memory_probe(spec: dict) -> dict:
    """Run in a fresh process: peak RSS of one step of ``spec["contender"]`` above the
    resident size once model and batch exist (see the module docstring). Returns bytes."""
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    model, images, labels = make_problem(spec["model"], spec["batch"], spec.get("depth"))
    contender = Contender(**spec["contender"])
    make_step(contender, model, images, labels)()  # warm-up, then forget its state
    if contender.grads != "kept":
        for p in model.parameters():
            p.grad = None
    gc.collect()
    step = make_step(contender, model, images, labels, seed=1)
    gc.collect()
    resident = _status_kib("VmRSS")
    exact = _reset_peak()
    step()
    peak = _status_kib("VmHWM")
    return {
        "resident_bytes": 1024 * resident,
        "peak_bytes": 1024 * peak,
        "above_bytes": 1024 * max(peak - resident, 0),
        "method": "VmHWM after clear_refs" if exact else "VmHWM over the process's life",
    }


def _probe_main(spec_json: str, out_path: str) -> None:
    """Entry point of the probe subprocess: writes ``memory_probe``'s result as JSON."""
    Path(out_path).write_text(json.dumps(memory_probe(json.loads(spec_json))))


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
        code = f"from forwardgrad.bench import _probe_main; {call}"
        env = {**os.environ, **_MALLOC_ENV}
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout_s
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"the memory probe for {contender.key} failed: {last}")
        return json.loads(out.read_text())


def memory_table(
    problems: Sequence[tuple[str, int | None, int]],
    contenders: Sequence[Contender],
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Peak memory above resident of each contender on each (model, depth, batch) problem,
    as a ratio to the backprop step that treats ``.grad`` the same way (``Contender.grads``)."""
    references = {"fresh": BACKPROP, "kept": BACKPROP_KEPT}
    needed = [references[g] for g in dict.fromkeys(c.grads for c in contenders)]
    contenders = [*[r for r in needed if r not in contenders], *contenders]
    rows = []
    for model_name, depth, batch in problems:
        network, _, _ = make_problem(model_name, 1, depth)
        param_bytes = sum(p.numel() * p.element_size() for p in network.parameters())
        del network
        results = {}
        for c in contenders:
            if progress:
                kept = ", .grad kept" if c.grads == "kept" else ""
                progress(f"memory: {model_name} depth={depth} batch={batch} {c.label}{kept}")
            results[c.key] = peak_memory(model_name, batch, c, depth, threads)
        for c in contenders:
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


# ---------------------------------------------------------------------------------------------
# The whole benchmark


@dataclass
class BenchConfig:
    """What ``run_benchmark`` measures; ``quick()`` is a smoke test of a minute or two."""

    models: tuple[str, ...] = ("logreg", "mlp", "cnn")
    batches: tuple[int, ...] = (64, 1024)
    tangents: tuple[int, ...] = (1, 4, 16)
    distributions: tuple[str, ...] = ("normal", "rademacher")
    rounds: int = 20
    warmup: int = 2
    budget_s: float = 300.0  # per (model, batch); fewer rounds (>= 3) past it, reported
    sampling_size: int = 1_863_690
    memory_depths: tuple[int, ...] = (4, 8, 16)
    memory_batch: int = 1024
    memory_width: int = 1024
    memory_cnn: bool = True
    threads: int | None = None
    skip: tuple[str, ...] = field(default_factory=tuple)  # of "timing", "sampling", "memory"

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(
            models=("logreg", "mlp"),
            batches=(64,),
            tangents=(1, 4),
            rounds=5,
            warmup=1,
            budget_s=20.0,
            sampling_size=1 << 20,
            memory_depths=(2, 4),
            memory_batch=256,
            memory_cnn=False,
        )

    def timing_contenders(self) -> list[Contender]:
        contenders = [BACKPROP, FORWARD]
        for k in self.tangents:
            contenders += [forward_gradient(k, d) for d in self.distributions]
        contenders += [forward_sgd(self.distributions[0]), ZEROTH_ORDER]
        return contenders

    def memory_contenders(self) -> list[Contender]:
        distribution = self.distributions[0]
        estimate = forward_gradient(1, distribution)
        fresh = [BACKPROP, FORWARD, estimate, forward_sgd(distribution)]
        return [*fresh, BACKPROP_KEPT, kept(estimate)]


def machine() -> dict:
    """What produced the numbers: CPU, cores, threads, torch, and the load at the time."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            names = [
                line.split(":", 1)[1].strip() for line in info if line.startswith("model name")
            ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def run_benchmark(config: BenchConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Run every part of ``config`` that is not skipped; returns the JSON-ready results."""
    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    results: dict = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": asdict(config),
        "timing": [],
        "sampling": [],
        "memory": [],
    }
    try:
        if "timing" not in config.skip:
            for model_name in config.models:
                for batch in config.batches:
                    if progress:
                        progress(f"timing: {model_name} batch {batch}")
                    results["timing"] += time_steps(
                        model_name,
                        batch,
                        config.timing_contenders(),
                        config.rounds,
                        config.warmup,
                        config.budget_s,
                    )
        if "sampling" not in config.skip:
            if progress:
                progress("sampling throughput")
            results["sampling"] = sampling_throughput(
                config.sampling_size, config.rounds, config.warmup
            )
        if "memory" not in config.skip:
            problems = [("deep-mlp", d, config.memory_batch) for d in config.memory_depths]
            if config.memory_cnn:
                problems.append(("cnn", None, config.memory_batch))
            results["memory"] = memory_table(
                problems, config.memory_contenders(), config.threads, progress
            )
    finally:
        torch.set_num_threads(threads_before)
    results["duration_s"] = time.perf_counter() - started
    results["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return results


# ---------------------------------------------------------------------------------------------
# Reporting


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
    json_path, md_path = out / "bench.json", out / "bench.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(to_markdown(results))
    return json_path, md_path


# ---------------------------------------------------------------------------------------------
# Command line (``forwardgrad bench``): flags and the config they give


def _numbers(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigurationError(
            f"expected comma-separated integers such as 1,4,16, got {text!r}."
        ) from None
    if not values or min(values) < 1:
        raise ConfigurationError(f"expected positive integers such as 1,4,16, got {text!r}.")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_arguments(parser) -> None:
    """The flags of ``forwardgrad bench`` on an ``argparse`` parser."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test (about a minute): logreg and mlp at batch 64, K=1,4, 5 rounds, small "
        "memory probes",
    )
    parser.add_argument("--out", default="bench", help="directory for bench.json and bench.md")
    parser.add_argument("--models", type=_names, help="of logreg,mlp,cnn (default: all)")
    parser.add_argument("--batches", type=_numbers, help="batch sizes (default: 64,1024)")
    parser.add_argument("--tangents", type=_numbers, help="values of K (default: 1,4,16)")
    parser.add_argument("--distributions", type=_names, help="of normal,rademacher (default: both)")
    parser.add_argument("--rounds", type=int, help="timed rounds per problem (default: 20)")
    parser.add_argument(
        "--budget", type=float, help="seconds per problem before fewer rounds (default: 300)"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument(
        "--skip", type=_names, default=(), help="parts to skip, of timing,sampling,memory"
    )


def config_from_args(args) -> BenchConfig:
    """The ``BenchConfig`` that ``forwardgrad bench``'s flags ask for."""
    config = BenchConfig.quick() if args.quick else BenchConfig()
    overrides = {
        "models": args.models,
        "batches": args.batches,
        "tangents": args.tangents,
        "distributions": args.distributions,
        "rounds": args.rounds,
        "budget_s": args.budget,
        "threads": args.threads,
    }
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    config.skip = tuple(args.skip)
    config.memory_cnn = config.memory_cnn and "cnn" in config.models  # the deep MLPs always
    known = {"models": ("logreg", "mlp", "cnn"), "distributions": ("normal", "rademacher")}
    known["skip"] = ("timing", "sampling", "memory")
    for name, allowed in known.items():
        unknown = [x for x in getattr(config, name) if x not in allowed]
        if unknown:
            raise ConfigurationError(
                f"unknown {name} {', '.join(unknown)}; choose from {', '.join(allowed)}."
            )
    if config.rounds < 1:
        raise ConfigurationError(f"--rounds must be at least 1, got {config.rounds}.")
    return config
