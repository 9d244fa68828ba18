"""``forwardgrad bench``'s flags and the ``BenchConfig`` they ask for."""

from __future__ import annotations

import argparse

from forwardgrad.bench.suite import PARTS, BenchConfig, bench_distributions, bench_models
from forwardgrad.cli.flags import comma_separated
from forwardgrad.errors import ConfigurationError


def _numbers(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in comma_separated(text))
    except ValueError:
        raise ConfigurationError(
            f"expected comma-separated integers such as 1,4,16, got {text!r}."
        ) from None
    if not values or min(values) < 1:
        raise ConfigurationError(f"expected positive integers such as 1,4,16, got {text!r}.")
    return values


def _ranks(text: str) -> tuple[int, ...]:
    """``--tangent-rank``: comma-separated ranks of at least 1, e.g. 1 or 1,4."""
    try:
        return _numbers(text)
    except ConfigurationError:
        raise argparse.ArgumentTypeError(
            f"ranks are comma-separated integers of at least 1 such as 1 or 1,4, got {text!r}"
        ) from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(comma_separated(text))


def add_arguments(parser) -> None:
    """The flags of ``forwardgrad bench`` on an ``argparse`` parser."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test (a minute or two): logreg and mlp at batch 64, K=1,4, 5 rounds, small "
        "memory probes",
    )
    parser.add_argument(
        "--zoo",
        action="store_true",
        help="measure the model zoo instead: per real architecture, exactness against autograd, "
        "the path taken and the K=1 dense and rank-1 step ratios to backprop (--models names zoo "
        "cases; --rounds default 7); writes zoo.md",
    )
    parser.add_argument("--out", default="bench", help="directory for bench.json and bench.md")
    parser.add_argument(
        "--models", type=_names, help=f"of {','.join(bench_models())} (default: all)"
    )
    parser.add_argument("--batches", type=_numbers, help="batch sizes (default: 64,1024)")
    parser.add_argument("--tangents", type=_numbers, help="values of K (default: 1,4,16)")
    parser.add_argument(
        "--distributions",
        type=_names,
        help=f"of {','.join(bench_distributions())} (default: all)",
    )
    parser.add_argument(
        "--tangent-rank",
        type=_ranks,
        metavar="R[,R...]",
        help="add forward-gradient and ForwardSGD contenders with structured tangents of rank R",
    )
    parser.add_argument("--rounds", type=int, help="timed rounds per problem (default: 20)")
    parser.add_argument(
        "--budget", type=float, help="seconds per problem before fewer rounds (default: 300)"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument(
        "--skip",
        type=_names,
        default=(),
        help=f"parts to skip, of {','.join(PARTS)} (local: the activity-perturbation, "
        "local-loss and local-guess contenders)",
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
        "ranks": args.tangent_rank,
    }
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    config.skip = tuple(args.skip)
    config.memory_cnn = config.memory_cnn and "cnn" in config.models  # the deep MLPs always
    known = {"models": bench_models(), "distributions": bench_distributions(), "skip": PARTS}
    for name, allowed in known.items():
        unknown = [x for x in getattr(config, name) if x not in allowed]
        if unknown:
            raise ConfigurationError(
                f"unknown {name} {', '.join(unknown)}; choose from {', '.join(allowed)}."
            )
    if config.rounds < 1:
        raise ConfigurationError(f"--rounds must be at least 1, got {config.rounds}.")
    return config
