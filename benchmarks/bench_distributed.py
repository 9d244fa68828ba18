"""Data-parallel step time and bytes all-reduced per step: forward gradient against DDP backprop.

For 1, 2 and 4 ranks (gloo on 127.0.0.1, one CPU thread per rank) and the paper's MLP and CNN,
each rank trains on its shard of the same global batch (64 MNIST-shaped random examples, SGD)
and rank 0 measures the wall time of whole steps (estimate + optimizer step) and the bytes it
handed to all-reduces. The forward gradient all-reduces K + 1 float64 numbers per step; DDP
all-reduces every gradient (4 bytes per parameter) plus the loss.

    python benchmarks/bench_distributed.py                      # the table for the README
    python benchmarks/bench_distributed.py --world-sizes 1,2 --models mlp --steps 5

With one rank the data-parallel forward-gradient step is also timed against the same estimator
without ``DataParallel`` (one process, no collective), the two alternated step by step: the
data-parallel step takes the same derivative engine (the fast path) and should cost the same.

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


def _contender(world, model_name: str, estimator_name: str, parallel: bool, batch: int):
    """One step function (estimate + SGD) and what it reports; the same data on every rank."""
    torch.manual_seed(0)
    model = make_model(model_name)
    estimator = make_estimator(estimator_name, seed=0)
    forward_model = model
    if parallel:
        estimator = DataParallel(estimator, world)
        forward_model = estimator.prepare(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    (shard_images, shard_labels), weight = (
        world.shard((images, labels))
        if parallel
        else (
            (images, labels),
            1.0,
        )
    )

    def closure():
        return F.cross_entropy(forward_model(shard_images), shard_labels)

    def step():
        estimator.estimate(model, weighted(closure, weight))
        optimizer.step()

    return step, estimator


def measure(world, model_name: str, contenders: list[tuple[str, bool]], args) -> list[tuple]:
    """Median step time (s), bytes all-reduced per step and the path taken, per contender
    (estimator name, data-parallel?), the contenders alternated step by step."""
    steps = [
        _contender(world, model_name, name, parallel, args.batch_size)
        for name, parallel in contenders
    ]
    times = [[] for _ in steps]
    for index in range(args.warmup + args.steps):
        for (step, _), measured in zip(steps, times):
            started = time.perf_counter()
            step()
            if index >= args.warmup:
                measured.append(time.perf_counter() - started)
    return [
        (statistics.median(t), getattr(e, "bytes_last_step", 0), getattr(e, "last_path", None))
        for (_, e), t in zip(steps, times)
    ]


def worker(rank: int, world_size: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    launch = Launch(rank, world_size, rank, "127.0.0.1", port)
    rows = []
    with process_group(launch, "gloo", timeout_s=600) as world:
        for model_name in args.models:
            for label, estimator_name in ESTIMATORS.items():
                contenders = [(estimator_name, True)]
                if world_size == 1 and estimator_name == "forward":
                    contenders.append((estimator_name, False))  # the same, one process
                results = measure(world, model_name, contenders, args)
                for (_, parallel), (seconds, sent, path) in zip(contenders, results):
                    shown = label if parallel else f"{label}, no DataParallel"
                    rows.append((model_name, shown, world_size, seconds, sent, path))
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
    single = {(m, e): s for m, e, n, s, _, _ in rows if n == 1}
    lines = [
        "| model | estimator | ranks | path | bytes all-reduced / step | step time (ms) "
        "| speed-up over 1 rank |",
        "|---|---|--:|---|--:|--:|--:|",
    ]
    for model_name, label, ranks, seconds, sent, path in sorted(
        rows, key=lambda r: (r[0], r[1], r[2])
    ):
        base = single.get((model_name, label))
        ratio = f"{base / seconds:.2f}x" if base else ""
        lines.append(
            f"| {model_name} | {label} | {ranks} | {path or '-'} | {sent:,} "
            f"| {seconds * 1e3:.1f} | {ratio} |"
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
