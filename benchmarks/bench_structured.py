"""Structured (rank-r) tangents against backprop and dense tangents: step time and peak memory.

    python benchmarks/bench_structured.py time --model mlp --batch 64 --rounds 40
    python benchmarks/bench_structured.py time --model mlp --batch 64 --tangents 16 --rounds 10
    python benchmarks/bench_structured.py time --model cnn --batch 64 --rounds 10
    python benchmarks/bench_structured.py memory --depths 4,8,16

Timing: one torch thread; every contender trains its own copy of the model on one random
MNIST-shaped batch, and the contenders take turns step by step, so that a change of the machine's
load hits them alike. Each round's time is divided by the backprop step's time in the same
round; the table gives the median of those ratios and their 10th and 90th percentiles.
Memory: the peak resident size above the size once model and batch exist, over the first step
(with the fast path's first-use checks) and over the ``--steps`` - 1 after it, each contender in
a fresh process whose library code was loaded first by a step on a tiny model.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import forwardgrad as fg
from forwardgrad.experiments.problems import make_model


def make_problem(model: str, batch: int, depth: int = 0, width: int = 1024):
    torch.manual_seed(0)
    if model == "deep-mlp":
        layers = [nn.Flatten(), nn.Linear(784, width), nn.ReLU()]
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        network = nn.Sequential(*layers, nn.Linear(width, 10))
    else:
        network = make_model(model)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    return network, images, labels


def contenders(tangents: int) -> dict[str, dict]:
    """name -> how to step: backprop, dense and rank-1 forward gradients (+ SGD), ForwardSGD."""
    dense = {"kind": "forward", "tangents": tangents, "distribution": "rademacher"}
    found = {
        "backprop": {"kind": "backprop"},
        f"FG K={tangents} dense rademacher": dense,
        f"FG K={tangents} rank 1 normal": {**dense, "distribution": "normal", "rank": 1},
        f"FG K={tangents} rank 1 rademacher": {**dense, "rank": 1},
        f"ForwardSGD K={tangents} rank 1 rademacher": {**dense, "kind": "sgd", "rank": 1},
    }
    if tangents == 1:
        found["FG K=1 dense normal"] = {**dense, "distribution": "normal"}
    return found


def make_step(spec: dict, model: nn.Module, images, labels, lr: float = 1e-4, seed: int = 0):
    def closure():
        return F.cross_entropy(model(images), labels)

    options = {k: v for k, v in spec.items() if k != "kind"}
    if spec["kind"] == "sgd":
        optimizer = fg.ForwardSGD(model, lr, seed=seed, **options)
        return lambda: optimizer.step(closure)
    if spec["kind"] == "backprop":
        estimator = fg.Backprop()
    else:
        estimator = fg.ForwardGradient(seed=seed, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def step():
        estimator.estimate(model, closure)
        optimizer.step()

    return step


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def time_contenders(model_name: str, batch: int, tangents: int, rounds: int) -> list[dict]:
    torch.set_num_threads(1)
    model, images, labels = make_problem(model_name, batch)
    specs = contenders(tangents)
    steps = {
        name: make_step(spec, copy.deepcopy(model), images, labels, seed=i)
        for i, (name, spec) in enumerate(specs.items())
    }
    for step in steps.values():  # first use: the fast path's checks, warm caches
        step()
        step()
    gc.collect()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    rows = []
    for name in steps:
        ratios = [t / b for t, b in zip(times[name], times["backprop"])]
        rows.append(
            {
                "contender": name,
                "median_ms": 1e3 * statistics.median(times[name]),
                "ratio": statistics.median(ratios),
                "p10": percentile(ratios, 0.1),
                "p90": percentile(ratios, 0.9),
            }
        )
    return rows


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def memory_probe(spec: dict) -> dict:
    """In a fresh process: peak RSS above the resident size once model and batch exist, over the
    first step (with the fast path's first-use checks) and over the steps after it. The library's
    code is loaded first by one step on a tiny model, so that its imports do not count."""
    torch.set_num_threads(1)
    tiny, tiny_images, tiny_labels = make_problem("deep-mlp", 4, 1, width=8)
    make_step(spec["contender"], tiny, tiny_images, tiny_labels)()
    del tiny
    model, images, labels = make_problem("deep-mlp", spec["batch"], spec["depth"])
    step = make_step(spec["contender"], model, images, labels)
    gc.collect()
    resident = _status_kib("VmRSS")
    peaks = []
    for steps in (1, spec["steps"] - 1):
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # VmHWM back to the current RSS
        for _ in range(steps):
            step()
            for p in model.parameters():  # as optimizer.zero_grad() does between steps
                p.grad = None
        peaks.append((_status_kib("VmHWM") - resident) / 1024)
    return {"first_mib": peaks[0], "later_mib": peaks[1]}


def memory_table(depths: list[int], batch: int, steps: int) -> list[dict]:
    specs = {
        "backprop": {"kind": "backprop"},
        "ForwardSGD dense rademacher": {"kind": "sgd", "distribution": "rademacher"},
        "ForwardSGD rank 1 rademacher": {"kind": "sgd", "distribution": "rademacher", "rank": 1},
        "ForwardSGD rank 1 normal": {"kind": "sgd", "distribution": "normal", "rank": 1},
    }
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    rows = []
    for depth in depths:
        peaks = {}
        for name, contender in specs.items():
            spec = {"batch": batch, "depth": depth, "steps": steps, "contender": contender}
            probe = f"b.memory_probe({spec!r})"
            code = f"import bench_structured as b, json; print(json.dumps({probe}))"
            done = subprocess.run(
                [sys.executable, "-c", code],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                cwd=os.path.dirname(os.path.abspath(__file__)),
            )
            peaks[name] = json.loads(done.stdout.splitlines()[-1])
        reference = max(peaks["backprop"].values())  # backprop's whole run
        for name, peak in peaks.items():
            whole = max(peak.values())
            rows.append({"depth": depth, "contender": name, **peak, "ratio": whole / reference})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["time", "memory"])
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--tangents", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--depths", default="4,8,16")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    if args.what == "time":
        batch = args.batch or 64
        rows = time_contenders(args.model, batch, args.tangents, args.rounds)
        print(f"\n{args.model}, batch {batch}, {args.rounds} alternated rounds, 1 thread")
        print("| contender | median step | ratio to backprop (p10-p90) |\n|---|---|---|")
        for r in rows:
            print(
                f"| {r['contender']} | {r['median_ms']:.2f} ms | "
                f"{r['ratio']:.2f}x ({r['p10']:.2f}-{r['p90']:.2f}) |"
            )
    else:
        batch = args.batch or 1024
        depths = [int(d) for d in args.depths.split(",")]
        rows = memory_table(depths, batch, args.steps)
        print(f"\ndeep MLP width 1024, batch {batch}, {args.steps} steps")
        print(
            "| depth | contender | first step | later steps | whole run, ratio to backprop's |\n"
            "|---|---|---|---|---|"
        )
        for r in rows:
            first, later = f"{r['first_mib']:.1f} MiB", f"{r['later_mib']:.1f} MiB"
            print(f"| {r['depth']} | {r['contender']} | {first} | {later} | {r['ratio']:.2f}x |")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
