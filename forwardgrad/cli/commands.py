"""The subcommands, registered in ``COMMANDS`` (name -> help, flags, function): adding one is one
entry. ``plot`` and ``bench`` live here; ``train``, ``compare`` and ``reproduce`` in their own
modules."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from forwardgrad import reporting
from forwardgrad.cli.compare import add_compare, add_reproduce, run_compare, run_reproduce
from forwardgrad.cli.flags import UsageError
from forwardgrad.cli.runs import PROG, Context
from forwardgrad.cli.train import add_train, run_train


def add_plot(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="run directories, or the --out of compare/reproduce",
    )
    parser.add_argument("--out", type=Path, help="where a comparison report goes")


def run_plot(args: argparse.Namespace, context: Context) -> int:
    for path in reporting.plot_runs(args.run_dirs, args.out):
        print(f"report: {path}")
    return 0


def add_bench(parser: argparse.ArgumentParser) -> None:
    from forwardgrad import bench

    bench.add_arguments(parser)


def run_bench(args: argparse.Namespace, context: Context) -> int:
    from forwardgrad import bench

    if args.zoo:
        return _run_zoo_bench(args, context)
    config = bench.config_from_args(args)
    say = (lambda line: print(f"{PROG}: {line}", file=sys.stderr)) if context.speaks else None
    results = bench.run_benchmark(config, progress=say)
    json_path, md_path = bench.write_results(results, args.out)
    print(bench.to_markdown(results))
    print(f"wrote {json_path} and {md_path}")
    return 0


def _run_zoo_bench(args: argparse.Namespace, context: Context) -> int:
    from forwardgrad.experiments.files import atomic_write
    from forwardgrad.zoo.registry import CASES, get_case
    from forwardgrad.zoo.table import format_table, state_table

    names = list(args.models or CASES)
    try:
        for name in names:
            get_case(name)
    except ValueError as error:  # the registry's sentence for an unknown name
        raise UsageError(str(error)) from None
    if args.rounds is not None and args.rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {args.rounds}.")
    available = [name for name in names if CASES[name].unavailable() is None]
    if not available:
        raise UsageError(f"no zoo case can be built here: {CASES[names[0]].unavailable()}")
    say = (lambda name: print(f"{PROG}: zoo {name}", file=sys.stderr)) if context.speaks else None
    table = format_table(state_table(available, "bench", args.rounds or 7, progress=say))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = atomic_write(out / "zoo.md", table + "\n")
    print(table)
    print(f"wrote {path}")
    return 0


@dataclass(frozen=True)
class Command:
    """A subcommand: its help line, a function adding its flags and one running it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Context], int]


COMMANDS: dict[str, Command] = {
    "train": Command("train one estimator on one problem", add_train, run_train),
    "compare": Command(
        "several estimators on one problem, same seed and data order, one report",
        add_compare,
        run_compare,
    ),
    "reproduce": Command(
        "every experiment of the paper (about 10 minutes on 2 cores; --full: the paper's budget)",
        add_reproduce,
        run_reproduce,
    ),
    "plot": Command("redraw plots and reports from the logs", add_plot, run_plot),
    "bench": Command(
        "time and peak memory of forward gradients against backprop (--quick: about a minute)",
        add_bench,
        run_bench,
    ),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) and goes through ``main``."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    """The ``forwardgrad`` parser with one subparser per entry of ``COMMANDS``."""
    parser = _Parser(
        prog=PROG,
        description="Train PyTorch models with forward gradients (Baydin et al. 2022) and "
        "compare them with backprop and zeroth-order.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(
            name, help=command.help, description=command.help[0].upper() + command.help[1:] + "."
        )
        command.add_arguments(sub)
    return parser
