"""The designs the derivative engine was chosen from, timed on the paper's MLP.

Contenders, alternated round by round in one process on one thread (each a ratio to the
backprop step of the same round; the table gives the median ratio and its interquartile range):

- ``fast``: the engine's stacked-tangent path (what ``ForwardGradient`` runs: drawing the
  tangents, the derivatives, the estimate into ``.grad``), and the same with rank-1 structured
  tangents;
- ``fast (derivatives only)``: ``fg.directional_derivatives`` along the same given tangents as
  ``torch.func``, the like-for-like comparison with it;
- ``general``: the engine's dual-tensor path, one evaluation per tangent;
- ``torch.func``: ``torch.func.jvp`` over ``functional_call``, with ``vmap`` over the K tangents
  (derivatives only: no estimate is formed);
- ``torch.compile``: ``torch.compile`` over that ``torch.func.jvp`` (K = 1; its compile time is
  reported apart).

    python benchmarks/engine_designs.py            # K = 1 and 16, batch 64, 20 rounds
    python benchmarks/engine_designs.py --no-compile --rounds 10

Prints a Markdown table; it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp, vmap

import forwardgrad as fg
from forwardgrad.experiments.problems import make_model
from forwardgrad.jvp import directional_derivatives
from forwardgrad.tangents.sources import GivenTangents


def contenders(model, x, y, counts, compile_too):
    params = {name: p.detach() for name, p in model.named_parameters()}
    names, values = list(params), tuple(params.values())

    def loss_of(*point):
        return F.cross_entropy(functional_call(model, dict(zip(names, point)), (x,)), y)

    def closure():
        return F.cross_entropy(model(x), y)

    backprop = fg.Backprop()
    steps = {"backprop step": lambda: backprop.estimate(model, closure)}
    for count in counts:
        fast = fg.ForwardGradient(count, "rademacher", seed=0)
        general = fg.ForwardGradient(count, "rademacher", seed=0, fast=False)
        structured = fg.ForwardGradient(count, "rademacher", seed=0, rank=1)
        directions = tuple(torch.randn(count, *v.shape).sign() for v in values)
        given = GivenTangents(list(model.parameters()), directions)
        steps[f"fast K={count}"] = lambda e=fast: e.estimate(model, closure)
        steps[f"fast K={count}, rank-1 tangents"] = lambda e=structured: e.estimate(model, closure)
        steps[f"fast K={count} (derivatives only)"] = lambda g=given: directional_derivatives(
            model, closure, g
        )
        steps[f"general K={count}"] = lambda e=general: e.estimate(model, closure)
        steps[f"torch.func K={count} (derivatives only)"] = _func_jvp(loss_of, values, directions)
    compile_seconds = None
    if compile_too:
        directions = tuple(torch.randn_like(v).sign() for v in values)
        compiled = torch.compile(lambda *t: jvp(loss_of, values, t))
        started = time.perf_counter()
        with torch.no_grad():
            compiled(*directions)
        compile_seconds = time.perf_counter() - started

        def run_compiled():
            with torch.no_grad():
                compiled(*directions)

        steps["torch.compile K=1 (derivatives only)"] = run_compiled
    return steps, compile_seconds


def _func_jvp(loss_of, values, directions):
    count = directions[0].shape[0]

    def step():
        with torch.no_grad():
            if count == 1:
                return jvp(loss_of, values, tuple(d[0] for d in directions))
            return vmap(lambda *t: jvp(loss_of, values, t), out_dims=(None, 0))(*directions)

    return step


def measure(steps, rounds, warmup=2):
    ratios = {name: [] for name in steps}
    for index in range(warmup + rounds):
        times = {}
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name] = time.perf_counter() - started
        if index >= warmup:
            for name in steps:
                ratios[name].append(times[name] / times["backprop step"])
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tangents", default="1,16", help="comma-separated K (default 1,16)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = make_model("mlp")
    x = torch.randn(args.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch_size,))
    counts = [int(k) for k in args.tangents.split(",")]
    steps, compile_seconds = contenders(model, x, y, counts, not args.no_compile)
    ratios = measure(steps, args.rounds)
    print("| contender | ratio to the backprop step (median) | interquartile range |")
    print("|---|--:|--:|")
    for name, values in ratios.items():
        q1, _, q3 = statistics.quantiles(values, n=4)
        print(f"| {name} | {statistics.median(values):.2f}x | {q1:.2f}-{q3:.2f} |")
    if compile_seconds is not None:
        print(f"\ntorch.compile's first call (compiling): {compile_seconds:.0f} s.")
    print(
        f"\nPaper MLP, batch {args.batch_size}, Rademacher tangents, one thread, "
        f"{args.rounds} alternated rounds, torch {torch.__version__}."
    )


if __name__ == "__main__":
    main()
