"""Data-parallel step time and bytes all-reduced per step: forward gradient against DDP backprop.

For 1, 2 and 4 ranks (gloo on 127.0.0.1, one CPU thread per rank) and the paper's MLP and CNN,
each rank trains on its shard of the same global batch (64 MNIST-shaped random examples, SGD)
and rank 0 measures the wall time of whole steps (estimate + optimizer step) and the bytes it
handed to all-reduces. The forward gradient all-reduces K + 1 float64 numbers per step; DDP
all-reduces every gradient (4 bytes per parameter) plus the loss.

    python benchmarks/bench_distributed.py                      # the table for the README
    python benchmarks/bench_distributed.py --world-sizes 1,2 --models mlp --steps 5

Prints a Markdown table; it does not assert anything. Timings include the other ranks'
waiting, so on a machine with fewer cores than ranks they measure oversubscription too.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from forwardgrad.distributed import DataParallel, Launch, process_group, weighted
from forwardgrad.estimators import make_estimator
from forwardgrad.experiments.problems import make_model

ESTIMATORS = {"forward (K=1)": "forward", "backprop (DDP)": "backprop"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(world, model_name: str, estimator_name: str, batch: int, warmup: int, steps: int):
    """Median step time (s) and bytes all-reduced per step on this rank."""
    torch.manual_seed(0)
    model = make_model(model_name)
    estimator = DataParallel(make_estimator(estimator_name, seed=0), world)
    forward_model = estimator.prepare(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    (shard_images, shard_labels), weight = world.shard((images, labels))

    def closure():
        return F.cross_entropy(forward_model(shard_images), shard_labels)

    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        estimator.estimate(model, weighted(closure, weight))
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times), estimator.bytes_last_step


def worker(rank: int, world_size: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    launch = Launch(rank, world_size, rank, "127.0.0.1", port)
    rows = []
    with process_group(launch, "gloo", timeout_s=600) as world:
        for model_name in args.models:
            for label, estimator_name in ESTIMATORS.items():
                seconds, sent = measure(
                    world, model_name, estimator_name, args.batch_size, args.warmup, args.steps
                )
                rows.append((model_name, label, world_size, seconds, sent))
    if rank == 0:
        torch.save(rows, Path(out) / f"world{world_size}.pt")


def run(world_size: int, args: argparse.Namespace) -> list[tuple]:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            worker,
            args=(world_size, free_port(), args, out),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        return torch.load(Path(out) / f"world{world_size}.pt")


def table(rows: list[tuple]) -> str:
    """Markdown: one line per model, estimator and world size, with the speed-up over 1 rank."""
    single = {(m, e): s for m, e, n, s, _ in rows if n == 1}
    lines = [
        "| model | estimator | ranks | bytes all-reduced / step | step time (ms) | vs 1 rank |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for model_name, label, ranks, seconds, sent in sorted(rows, key=lambda r: (r[0], r[1], r[2])):
        base = single.get((model_name, label))
        ratio = f"{base / seconds:.2f}x" if base else ""
        lines.append(
            f"| {model_name} | {label} | {ranks} | {sent:,} | {seconds * 1e3:.1f} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", default="1,2,4", help="comma-separated (default 1,2,4)")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated (default mlp,cnn)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (default 64)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (default 2)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    args = parser.parse_args()
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    sizes = [int(n) for n in args.world_sizes.split(",") if n.strip()]
    rows = []
    for world_size in sizes:
        rows += run(world_size, args)
    print(table(rows))
    print(
        f"\ngloo on 127.0.0.1, global batch {args.batch_size}, one thread per rank, median of "
        f"{args.steps} steps after {args.warmup} warm-up; {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}."
    )


if __name__ == "__main__":
    main()
