"""The flags of the subcommands, the same everywhere they apply, and the TrainConfig they give.

Choices come from the registries: problems and data sets (``forwardgrad.experiments``),
estimators, distributions and combiners (the library), optimizers and constraint sets.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable

from forwardgrad.cli.specs import SPEC_SYNTAX, EstimatorSpec, parse_specs
from forwardgrad.errors import ConfigurationError
from forwardgrad.experiments.config import TrainConfig
from forwardgrad.experiments.datasets import DATASETS
from forwardgrad.experiments.methods import COMPARED_BY_DEFAULT, GUESSES, RUN_ESTIMATORS
from forwardgrad.experiments.optimizers import FRANK_WOLFE, FRANK_WOLFE_DEFAULTS, OPTIMIZERS
from forwardgrad.experiments.problems import PROBLEMS
from forwardgrad.experiments.sweep import DEFAULT_LR_CANDIDATES
from forwardgrad.optim.constraints import CONSTRAINT_SYNTAX
from forwardgrad.optim.frank_wolfe import OPEN_LOOP
from forwardgrad.tangents import COMBINERS, DISTRIBUTIONS


class UsageError(ConfigurationError):
    """A command-line mistake: reported in one line with exit code 2."""


# TrainConfig fields a user may set by a flag of the same name (``lr_decay``: ``--lr-decay``).
CONFIG_FLAGS = (
    "problem",
    "dataset",
    "data_dir",
    "dim",
    "tangents",
    "distribution",
    "combine",
    "eps",
    "tangent_rank",
    "local_losses",
    "guess",
    "optimizer",
    "constraint",
    "lr",
    "lr_decay",
    "batch_size",
    "steps",
    "epochs",
    "seed",
    "threads",
    "eval_every",
    "log_every",
    "checkpoint_every",
    "test_examples",
    "cosine_every",
)


# One thread by default: alternated 1- and 2-thread steps on 2 shared cores ran the MLP step
# in about the same time, and the logreg step 30-50 times slower with 2 threads under load.
DEFAULT_THREADS = 1


def comma_separated(text: str) -> list[str]:
    """The items of a comma-separated flag value, stripped, empty ones dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def names(choices: Iterable[str] | None = None) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of names, each one of ``choices``."""
    allowed = list(choices) if choices is not None else None

    def parse(text: str) -> list[str]:
        items = comma_separated(text)
        if not items:
            raise argparse.ArgumentTypeError("give at least one name, comma-separated")
        for item in items:
            if allowed is not None and item not in allowed:
                raise argparse.ArgumentTypeError(
                    f"unknown name {item!r}; choose from {', '.join(allowed)}"
                )
        return items

    return parse


def learning_rates(text: str) -> list[float]:
    """An argparse type: comma-separated positive learning rates."""
    try:
        values = [float(item) for item in comma_separated(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"learning rates must be positive numbers, got {text!r}")
    return values


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        choices=list(DATASETS),
        help=f"image data set for the MNIST models (default {TrainConfig.dataset})",
    )
    parser.add_argument(
        "--data-dir",
        help="folder with the IDX files (default: $FORWARDGRAD_DATA_DIR, else the user cache)",
    )
    parser.add_argument(
        "--no-download",
        action="store_true",
        help="fail instead of downloading a missing data set",
    )


def add_machine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, help="seeds model init, data order and tangents (0)")
    parser.add_argument(
        "--threads",
        type=int,
        help=f"torch CPU threads (default {DEFAULT_THREADS}: steadier and, on a shared machine, "
        "faster than two; see the README)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar or progress lines on stderr"
    )


def add_estimators_flag(parser: argparse.ArgumentParser, what: str = "comma-separated") -> None:
    parser.add_argument(
        "--estimators",
        type=parse_specs,
        default=[EstimatorSpec(name) for name in COMPARED_BY_DEFAULT],
        metavar="SPEC,SPEC,...",
        help=f"{what}; each spec is {SPEC_SYNTAX}, an item KEY=VALUE continuing the spec "
        f"before it, e.g. forward,forward:rank=1,activity,backprop; names "
        f"{', '.join(RUN_ESTIMATORS)} (default {','.join(COMPARED_BY_DEFAULT)})",
    )


def add_method_flags(parser: argparse.ArgumentParser, single_estimator: bool) -> None:
    """--tangent-rank, --local-losses and --guess."""
    where = "" if single_estimator else " (the runs it applies to)"
    parser.add_argument(
        "--tangent-rank",
        type=int,
        metavar="R",
        help=f"forward: structured tangents of rank R for every matrix and conv kernel{where} "
        "(default: dense tangents)",
    )
    parser.add_argument(
        "--local-losses",
        action="store_true",
        default=None,
        help="forward, activity, backprop on mlp, deep-mlp, cnn: train blocks (each hidden "
        f"layer of an MLP, each conv stage of the CNN) on local losses of auxiliary heads{where}",
    )
    parser.add_argument(
        "--guess",
        choices=list(GUESSES),
        help="forward with --local-losses: each block's local-loss gradient as its direction"
        + where,
    )


def _problem_defaults(key: str) -> str:
    """E.g. "beale 0.01; rosenbrock 0.001": the problems' own defaults for ``key``."""
    own = [(name, p.defaults[key]) for name, p in PROBLEMS.items() if key in p.defaults]
    return "; ".join(f"{name} {value:g}" for name, value in own)


def add_run_flags(parser: argparse.ArgumentParser, single_estimator: bool) -> None:
    """The flags shared by ``train`` and ``compare``; defaults None mean "not given"."""
    parser.add_argument(
        "--problem",
        choices=list(PROBLEMS),
        help=f"a test function or an MNIST-style model (default {TrainConfig.problem})",
    )
    add_data_flags(parser)
    parser.add_argument("--dim", type=int, help="dimension of rosenbrock (default 2)")
    _add_estimator_flags(parser, single_estimator)
    _add_optimizer_flags(parser, single_estimator)
    _add_budget_flags(parser)
    add_machine_flags(parser)
    _add_interval_flags(parser)
    _add_sweep_flags(parser)


def _add_estimator_flags(parser: argparse.ArgumentParser, single_estimator: bool) -> None:
    d = TrainConfig()
    if single_estimator:
        parser.add_argument("--estimator", choices=list(RUN_ESTIMATORS), help="(default forward)")
    else:
        add_estimators_flag(parser, "comma-separated, run with the same seed and data order")
    add_method_flags(parser, single_estimator)
    parser.add_argument("--tangents", type=int, help=f"K tangents per step (default {d.tangents})")
    parser.add_argument("--distribution", choices=list(DISTRIBUTIONS), help="(default normal)")
    parser.add_argument(
        "--combine", choices=list(COMBINERS), help="how K tangents combine (default mean)"
    )
    parser.add_argument("--eps", type=float, help=f"zeroth-order step ε (default {d.eps:g})")


def _add_optimizer_flags(parser: argparse.ArgumentParser, single_estimator: bool) -> None:
    parser.add_argument(
        "--optimizer",
        choices=list(OPTIMIZERS),
        help="momentum is SGD with 0.9; frank-wolfe needs --constraint (default sgd)",
    )
    parser.add_argument(
        "--constraint",
        metavar="SET",
        help=f"frank-wolfe: the set each parameter stays in, {CONSTRAINT_SYNTAX}; under nuclear:R "
        "biases get the L2 ball of radius R",
    )
    averaging_help = (
        "frank-wolfe: feed the oracle the latest gradient estimate instead of the running average"
    )
    if single_estimator:
        parser.add_argument("--no-averaging", action="store_true", help=averaging_help)
        return
    averaging = parser.add_mutually_exclusive_group()
    averaging.add_argument(
        "--averaging",
        choices=["on", "off", "both"],
        help="frank-wolfe: the running average of the estimates (on), the latest estimate "
        "(off), or each estimator both ways (both) (default on)",
    )
    averaging.add_argument("--no-averaging", action="store_true", help="--averaging off")


def _add_budget_flags(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument(
        "--lr",
        type=float,
        help=f"η₀ (default {d.lr:g}; {_problem_defaults('lr')}); frank-wolfe: a constant step in "
        f"(0, 1] instead of {OPEN_LOOP}",
    )
    parser.add_argument(
        "--lr-decay",
        type=float,
        help=f"k in η₀·exp(−i·k) (default {d.lr_decay:g}; test functions and frank-wolfe 0)",
    )
    parser.add_argument("--batch-size", type=int, help=f"(default {d.batch_size})")
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument(
        "--steps", type=int, help=f"updates (default {d.steps}; {_problem_defaults('steps')})"
    )
    steps.add_argument("--epochs", type=float, help="passes over the training set, instead")


def _add_interval_flags(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("--eval-every", type=int, help=f"steps (default {d.eval_every}; 0: end)")
    parser.add_argument("--log-every", type=int, help=f"steps (default {d.log_every})")
    parser.add_argument(
        "--checkpoint-every", type=int, help=f"steps (default {d.checkpoint_every}; 0: end)"
    )
    parser.add_argument("--test-examples", type=int, help="evaluate on the first N only")
    add_cosine_flag(parser, "default 0: never")


def add_cosine_flag(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--cosine-every",
        type=int,
        metavar="N",
        help="every N steps, log the cosine between the estimate and the exact gradient of the "
        f"loss it targets (untimed; training is unchanged) ({default})",
    )


def _add_sweep_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lr-sweep",
        nargs="?",
        const=list(DEFAULT_LR_CANDIDATES),
        type=learning_rates,
        metavar="LR,LR,...",
        help="pick each estimator's lr by a short sweep on a held-out 10%% of the training set "
        f"(default candidates {','.join(f'{lr:g}' for lr in DEFAULT_LR_CANDIDATES)})",
    )
    parser.add_argument(
        "--sweep-steps", type=int, help="steps per sweep candidate (default: a quarter of --steps)"
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the flags that were given; problem-specific defaults for the rest."""
    given = {name: getattr(args, name) for name in CONFIG_FLAGS if getattr(args, name) is not None}
    problem = PROBLEMS.get(given.get("problem", TrainConfig.problem))
    frank_wolfe = given.get("optimizer") == FRANK_WOLFE
    values = {
        **(problem.defaults if problem is not None else {}),
        **(FRANK_WOLFE_DEFAULTS if frank_wolfe else {}),
        **given,
    }
    values.setdefault("threads", DEFAULT_THREADS)
    if "epochs" in given:
        values["steps"] = None
    if getattr(args, "estimator", None):
        values["estimator"] = args.estimator
    if args.no_averaging or getattr(args, "averaging", None) == "off":
        values["fw_averaging"] = False
    if getattr(args, "averaging", None) == "both" and not frank_wolfe:
        raise UsageError("--averaging both only applies to --optimizer frank-wolfe; drop it.")
    if args.lr_sweep and frank_wolfe:
        raise UsageError(
            f"--lr-sweep does not apply to frank-wolfe, whose step size is {OPEN_LOOP}; drop it "
            "(or give a constant step with --lr)."
        )
    return TrainConfig(**values).validate()
