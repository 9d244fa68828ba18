"""The ``forwardgrad`` command line: ``train``, ``compare``, ``reproduce`` and ``plot``.

Subcommands are registered in ``COMMANDS`` (name -> help, flags, function), so adding one, like
``bench``, is one entry. Every subcommand returns an exit code: 0 done, 1 a run diverged
(``train``), 2 bad arguments or data (one line on stderr, never a traceback), 3 a distributed
job failed (a rank died, hung or diverged from the others), 130/143 stopped by SIGINT/SIGTERM
after writing a checkpoint.

Under ``torchrun`` (RANK, WORLD_SIZE, ... in the environment) ``train`` runs as one rank of a
data-parallel job (``forwardgrad.distributed``); only rank 0 prints, writes and reports.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from forwardgrad import reporting
from forwardgrad.distributed import DistributedError, World, detect_launch, process_group
from forwardgrad.errors import CheckpointError, DataError
from forwardgrad.estimators import ESTIMATORS
from forwardgrad.experiments.callbacks import Progress
from forwardgrad.experiments.config import TrainConfig, load_config
from forwardgrad.experiments.datasets import DATASETS, load_dataset
from forwardgrad.experiments.labels import run_label
from forwardgrad.experiments.loop import (
    CheckpointWarning,
    TrainingDiverged,
    TrainingInterrupted,
    train,
)
from forwardgrad.experiments.optimizers import FRANK_WOLFE, OPTIMIZERS
from forwardgrad.experiments.problems import PROBLEMS
from forwardgrad.experiments.sweep import DEFAULT_LR_CANDIDATES, sweep_learning_rate
from forwardgrad.optim.constraints import CONSTRAINT_SYNTAX
from forwardgrad.optim.frank_wolfe import OPEN_LOOP
from forwardgrad.tangents import COMBINERS, DISTRIBUTIONS

PROG = "forwardgrad"
EXIT_DIVERGED = 1
EXIT_USAGE = 2
EXIT_DISTRIBUTED = 3

# Settings of the test functions when the user gives none (the paper's lr 2e-4 is for MNIST
# and barely moves a test function): plain gradient descent converges at these on both.
TEST_FUNCTION_DEFAULTS = {
    "beale": {"lr": 0.01, "lr_decay": 0.0, "steps": 2000, "log_every": 5},
    "rosenbrock": {"lr": 1e-3, "lr_decay": 0.0, "steps": 5000, "log_every": 10},
}
# Frank-Wolfe's step size is its own 2/(t+2) unless --lr gives a constant in (0, 1].
FRANK_WOLFE_DEFAULTS = {"lr": OPEN_LOOP, "lr_decay": 0.0}


class UsageError(ValueError):
    """A command-line mistake: reported in one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) and goes through ``main``."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------- progress


class ProgressDisplay:
    """Shows ``Progress`` events: a tqdm bar (loss, steps/s, ETA) on a terminal, else a plain
    line about every tenth of a run. One bar or series of lines per run (a run starts with the
    event whose ``train_loss`` is None)."""

    def __init__(self, stream=None, mode: str = "auto"):
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode = mode
        self.bar = None
        self.started = 0.0
        self.first_step = 0
        self.next_line = 0

    def __call__(self, event: Progress) -> None:
        if self.mode == "none":
            return
        if event.train_loss is None:
            self._start(event)
            return
        if self.mode == "bar":
            self.bar.update(event.step - self.bar.n)
            self.bar.set_postfix_str(self._postfix(event), refresh=False)
            if event.step >= event.total_steps:
                self.close()
        elif event.step >= self.next_line or event.step >= event.total_steps:
            rate = (event.step - self.first_step) / max(time.monotonic() - self.started, 1e-9)
            eta = (event.total_steps - event.step) / rate if rate > 0 else math.inf
            print(
                f"{event.label}: step {event.step}/{event.total_steps}, {self._postfix(event)}, "
                f"{rate:.3g} steps/s, ETA {_duration(eta)}",
                file=self.stream,
                flush=True,
            )
            self.next_line = event.step + max(1, event.total_steps // 10)

    def _start(self, event: Progress) -> None:
        self.close()
        self.started, self.first_step = time.monotonic(), event.step
        self.next_line = event.step + max(1, event.total_steps // 10)
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(
                total=event.total_steps,
                initial=event.step,
                desc=event.label,
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
                leave=True,
            )
        else:
            print(f"{event.label}: from step {event.step} to {event.total_steps}", file=self.stream)

    @staticmethod
    def _postfix(event: Progress) -> str:
        text = f"loss {event.train_loss:.4g}"
        if event.test_accuracy is not None:
            text += f", test acc {event.test_accuracy:.3f}"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


# --------------------------------------------------------------------------- flags

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
)


def _csv_list(choices: Sequence[str] | None = None) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("give at least one name, comma-separated")
        for item in items:
            if choices is not None and item not in choices:
                raise argparse.ArgumentTypeError(
                    f"unknown name {item!r}; choose from {', '.join(choices)}"
                )
        return items

    return parse


def _lr_list(text: str) -> list[float]:
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"learning rates must be positive numbers, got {text!r}")
    return values


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    default = TrainConfig()
    parser.add_argument(
        "--dataset",
        choices=list(DATASETS),
        help=f"image data set for logreg/mlp/cnn (default {default.dataset})",
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


def _add_machine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, help="seeds model init, data order and tangents (0)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar or progress lines on stderr"
    )


def _add_run_flags(parser: argparse.ArgumentParser, single_estimator: bool) -> None:
    """The flags shared by ``train`` and ``compare``; defaults None mean "not given"."""
    d = TrainConfig()
    parser.add_argument(
        "--problem",
        choices=list(PROBLEMS),
        help=f"a test function or an MNIST-style model (default {d.problem})",
    )
    _add_data_flags(parser)
    parser.add_argument("--dim", type=int, help="dimension of rosenbrock (default 2)")
    if single_estimator:
        parser.add_argument("--estimator", choices=list(ESTIMATORS), help="(default forward)")
    else:
        parser.add_argument(
            "--estimators",
            type=_csv_list(ESTIMATORS),
            default=list(ESTIMATORS),
            help="comma-separated, run with the same seed and data order "
            "(default forward,backprop,zeroth-order)",
        )
    parser.add_argument("--tangents", type=int, help=f"K tangents per step (default {d.tangents})")
    parser.add_argument("--distribution", choices=list(DISTRIBUTIONS), help="(default normal)")
    parser.add_argument(
        "--combine", choices=list(COMBINERS), help="how K tangents combine (default mean)"
    )
    parser.add_argument("--eps", type=float, help=f"zeroth-order step ε (default {d.eps:g})")
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
    else:
        averaging = parser.add_mutually_exclusive_group()
        averaging.add_argument(
            "--averaging",
            choices=["on", "off", "both"],
            help="frank-wolfe: the running average of the estimates (on), the latest estimate "
            "(off), or each estimator both ways (both) (default on)",
        )
        averaging.add_argument("--no-averaging", action="store_true", help="--averaging off")
    own = "; ".join(f"{name} {v['lr']:g}" for name, v in TEST_FUNCTION_DEFAULTS.items())
    parser.add_argument(
        "--lr",
        type=float,
        help=f"η₀ (default {d.lr:g}; {own}); frank-wolfe: a constant step in (0, 1] instead of "
        f"{OPEN_LOOP}",
    )
    parser.add_argument(
        "--lr-decay",
        type=float,
        help=f"k in η₀·exp(−i·k) (default {d.lr_decay:g}; test functions and frank-wolfe 0)",
    )
    parser.add_argument("--batch-size", type=int, help=f"(default {d.batch_size})")
    steps = parser.add_mutually_exclusive_group()
    own_steps = "; ".join(f"{name} {v['steps']}" for name, v in TEST_FUNCTION_DEFAULTS.items())
    steps.add_argument("--steps", type=int, help=f"updates (default {d.steps}; {own_steps})")
    steps.add_argument("--epochs", type=float, help="passes over the training set, instead")
    _add_machine_flags(parser)
    parser.add_argument("--eval-every", type=int, help=f"steps (default {d.eval_every}; 0: end)")
    parser.add_argument("--log-every", type=int, help=f"steps (default {d.log_every})")
    parser.add_argument(
        "--checkpoint-every", type=int, help=f"steps (default {d.checkpoint_every}; 0: end)"
    )
    parser.add_argument("--test-examples", type=int, help="evaluate on the first N only")
    parser.add_argument(
        "--lr-sweep",
        nargs="?",
        const=list(DEFAULT_LR_CANDIDATES),
        type=_lr_list,
        metavar="LR,LR,...",
        help="pick each estimator's lr by a short sweep on a held-out 10%% of the training set "
        f"(default candidates {','.join(f'{lr:g}' for lr in DEFAULT_LR_CANDIDATES)})",
    )
    parser.add_argument(
        "--sweep-steps", type=int, help="steps per sweep candidate (default: a quarter of --steps)"
    )


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the flags that were given; problem-specific defaults for the rest."""
    given = {name: getattr(args, name) for name in CONFIG_FLAGS if getattr(args, name) is not None}
    problem = given.get("problem", TrainConfig.problem)
    frank_wolfe = given.get("optimizer") == FRANK_WOLFE
    values = {
        **TEST_FUNCTION_DEFAULTS.get(problem, {}),
        **(FRANK_WOLFE_DEFAULTS if frank_wolfe else {}),
        **given,
    }
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


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "run"


def _label(config: TrainConfig) -> str:
    return run_label(config)


def _default_out(kind: str) -> Path:
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


# --------------------------------------------------------------------------- running runs


@dataclass
class _Context:
    """What every subcommand needs besides its flags."""

    argv: list[str]
    display: ProgressDisplay
    download: bool
    resume_hint: str = ""  # how to continue after an interrupt, set once the output is known
    world: World | None = None  # this rank, under torchrun

    @property
    def speaks(self) -> bool:
        """Whether this process prints: always, except ranks other than 0 of a distributed job."""
        return self.world is None or self.world.is_main


@dataclass(frozen=True)
class _Planned:
    """One run of a comparison; with ``candidates``, its lr is chosen by a sweep first."""

    config: TrainConfig
    run_dir: Path
    candidates: Sequence[float] | None = None
    sweep_steps: int | None = None


def _sweep(
    config: TrainConfig, candidates: Sequence[float], steps: int | None, context: _Context
) -> tuple[TrainConfig, dict]:
    """Run the lr sweep for ``config``; the tuned config and what to record about the sweep."""
    steps = steps or max(1, (config.steps or 1000) // 4)
    result = sweep_learning_rate(
        config, candidates, steps=steps, progress=context.display, download=context.download
    )
    context.display.close()
    record = {
        "best_lr": result.best_lr,
        "criterion": result.criterion,
        "steps_per_candidate": steps,
        "scores": {f"{lr:g}": (s if math.isfinite(s) else None) for lr, s in result.scores.items()},
    }
    return replace(config, lr=result.best_lr, lr_selected_by="sweep"), record


# Fields that may differ between a planned run and the run found on disk without changing what
# the run computes (threads are resolved when training starts).
_IRRELEVANT = {"data_dir", "threads", "eval_every", "log_every", "checkpoint_every"}


def _same_settings(config: TrainConfig, run_dir: Path, tuned: bool) -> bool:
    stored = json.loads((run_dir / "config.json").read_text())
    skip = set(_IRRELEVANT)
    if tuned:
        skip |= {"lr", "lr_selected_by"}
    if config.epochs is not None:
        skip.add("steps")
    # A field newer than the stored run (e.g. constraint) counts as its default there.
    defaults = asdict(TrainConfig())
    return all(stored.get(k, defaults[k]) == v for k, v in asdict(config).items() if k not in skip)


def _run_or_continue(planned: _Planned, context: _Context) -> Path:
    """Train into the planned run directory, or keep the run already there if it has the same
    settings: a finished one is kept, an interrupted one resumed. So rerunning an interrupted
    ``compare`` or ``reproduce`` with the same flags and ``--out`` continues it."""
    config, run_dir, tuned = planned.config, planned.run_dir, planned.candidates is not None
    if (run_dir / "config.json").is_file():
        if not _same_settings(config, run_dir, tuned):
            raise UsageError(
                f"{run_dir} holds a run with other settings; choose another --out or delete it."
            )
        if not (run_dir / "summary.json").is_file():
            stored = replace(load_config(run_dir), data_dir=config.data_dir)
            train(stored, run_dir, context.display, resume=True, download=context.download)
        return run_dir
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise UsageError(f"{run_dir} holds files but no run; choose another --out or delete it.")
    record = None
    if tuned:
        config, record = _sweep(config, planned.candidates, planned.sweep_steps, context)
    train(config, run_dir, context.display, download=context.download, command=context.argv)
    if record is not None:
        (run_dir / "lr_sweep.json").write_text(json.dumps(record, indent=2) + "\n")
    return run_dir


def _run_all(plan: Sequence[_Planned], context: _Context) -> list[Path]:
    """Run every planned run in order; a diverged run is reported, kept, and the rest go on."""
    # Check every setting and data set before the first run starts, not an hour into it.
    checked = set()
    for planned in plan:
        config = planned.config.validate()
        if config.dataset is not None and (config.dataset, config.data_dir) not in checked:
            load_dataset(config.dataset, config.data_dir, context.download)
            checked.add((config.dataset, config.data_dir))
    done = []
    for planned in plan:
        try:
            done.append(_run_or_continue(planned, context))
        except TrainingDiverged as error:
            context.display.close()
            print(f"{PROG}: warning: {planned.run_dir}: {error}", file=sys.stderr)
            done.append(planned.run_dir)
        context.display.close()
    return done


def _write_reports(out: Path, run_dirs: Sequence[Path], title: str) -> Path:
    for run_dir in run_dirs:
        reporting.write_run_report(run_dir)
    return reporting.write_comparison_report(out, run_dirs, title=title)


# --------------------------------------------------------------------------- subcommands


def _add_train(parser: argparse.ArgumentParser) -> None:
    _add_run_flags(parser, single_estimator=True)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="new run directory (default runs/train-<time>)")
    where.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue RUN_DIR from its last checkpoint with its own settings "
        "(--steps/--epochs may extend it, --data-dir may move the data)",
    )


def _run_train(args, context: _Context) -> int:
    if args.resume is not None:
        allowed = {"steps", "epochs", "data_dir", "quiet", "no_download", "resume", "command"}
        extra = [
            "--" + name.replace("_", "-")
            for name, value in vars(args).items()
            if name not in allowed and value not in (None, False)
        ]
        if extra:
            raise UsageError(
                f"--resume takes the settings of {args.resume}/config.json; drop {', '.join(extra)}"
            )
        config, run_dir = load_config(args.resume), args.resume
        if args.data_dir is not None:
            config.data_dir = args.data_dir
        if args.steps is not None or args.epochs is not None:
            config.steps, config.epochs = args.steps, args.epochs
        context.resume_hint = f"{PROG} train --resume {shlex.quote(str(run_dir))}"
        result = train(
            config,
            run_dir,
            context.display,
            resume=True,
            download=context.download,
            world=context.world,
        )
    else:
        config = _config_from_args(args)
        run_dir = args.out or _default_out(f"train-{config.problem}-{config.estimator}")
        resume = False
        if context.world is not None:
            # Every rank takes rank 0's directory and decision. After a restart by torchrun
            # --max-restarts the run continues from its last checkpoint.
            restarted = context.world.restart_count > 0 and (run_dir / "config.json").is_file()
            run_dir, resume = context.world.broadcast_object(
                (run_dir, restarted), "agreeing on the run directory"
            )
        context.resume_hint = f"{PROG} train --resume {shlex.quote(str(run_dir))}"
        record = None
        if args.lr_sweep:
            if not resume and run_dir.is_dir() and any(run_dir.iterdir()):  # before, not after
                raise UsageError(f"{run_dir} already holds files; choose another --out.")
            config, record = _sweep(config, args.lr_sweep, args.sweep_steps, context)
        result = train(
            config,
            run_dir,
            context.display,
            resume=resume,
            download=context.download,
            command=context.argv,
            world=context.world,
        )
        if record is not None and context.speaks:
            (run_dir / "lr_sweep.json").write_text(json.dumps(record, indent=2) + "\n")
    context.display.close()
    if not context.speaks:
        return 0
    report = reporting.write_run_report(run_dir)
    summary = result.summary
    line = f"{summary['label']} on {summary['problem']}: final train loss "
    line += _number(summary["final_train_loss"], ".4g")
    if summary["final_test_accuracy"] is not None:
        line += ", test accuracy " + _number(summary["final_test_accuracy"], ".4f")
    print(f"{line}\nreport: {report}")
    return 0


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _continue_hint(argv: Sequence[str], out: Path) -> str:
    """The command again, with ``--out`` set, which continues an interrupted comparison."""
    argv = list(argv)
    if "--out" not in argv and not any(arg.startswith("--out=") for arg in argv):
        argv += ["--out", str(out)]
    return shlex.join(argv)


def _add_compare(parser: argparse.ArgumentParser) -> None:
    _add_run_flags(parser, single_estimator=False)
    parser.add_argument(
        "--out",
        type=Path,
        help="comparison directory, one run directory per estimator (default "
        "runs/compare-<time>); rerun with the same --out to continue an interrupted comparison",
    )


def _run_compare(args, context: _Context) -> int:
    base = _config_from_args(args)
    out = args.out or _default_out(f"compare-{base.problem}")
    context.resume_hint = _continue_hint(context.argv, out)
    averaging = (True, False) if args.averaging == "both" else (base.fw_averaging,)
    plan = []
    for name in dict.fromkeys(args.estimators):
        for fw_averaging in averaging:
            config = replace(base, estimator=name, fw_averaging=fw_averaging)
            if args.lr_sweep:
                run_dir = out / (_slug(_label(config)) + "-own-lr")
                plan.append(_Planned(config, run_dir, args.lr_sweep, args.sweep_steps))
            else:
                plan.append(_Planned(config, out / _slug(_label(config))))
    run_dirs = _run_all(plan, context)
    report = _write_reports(out, run_dirs, f"forwardgrad compare: {base.problem}")
    print(f"report: {report}")
    return 0


@dataclass(frozen=True)
class Experiment:
    """One problem of ``reproduce``: its budgets (quick default and ``--full``, each with the
    steps per sweep candidate) and the learning rates its sweep tries (none: no sweep).

    ``name`` is its ``--problems`` name and output folder (default: the problem). ``runs``, if
    given, lists the runs (each a dict of TrainConfig fields, with ``estimator``) instead of one
    run per estimator of ``--estimators``; runs of estimators not in ``--estimators`` are skipped.
    """

    problem: str
    quick: dict
    full: dict
    sweep_candidates: tuple[float, ...]
    name: str = ""
    runs: tuple[dict, ...] = ()

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", self.problem)


# MNIST models use the paper's setting (batch 64, SGD, η₀ = 2e-4, k = 1e-4); PAPER.md gives no
# iteration budget, so --full runs 10 epochs. Test functions use plain gradient-descent step
# sizes at which backprop converges. The quick budget is sized to finish all five problems,
# both comparisons, in about ten minutes on 2 CPU cores.
EXPERIMENTS = (
    Experiment(
        "beale",
        quick={"steps": 1000, "lr": 0.01, "lr_decay": 0.0, "log_every": 5, "sweep_steps": 500},
        full={"steps": 10000, "lr": 0.01, "lr_decay": 0.0, "log_every": 10, "sweep_steps": 2000},
        sweep_candidates=(1e-3, 3e-3, 1e-2, 3e-2),
    ),
    Experiment(
        "rosenbrock",
        quick={"steps": 6000, "lr": 1e-3, "lr_decay": 0.0, "log_every": 10, "sweep_steps": 1500},
        full={"steps": 20000, "lr": 1e-3, "lr_decay": 0.0, "log_every": 20, "sweep_steps": 4000},
        sweep_candidates=(1e-4, 3e-4, 1e-3, 2e-3),
    ),
    Experiment(
        "logreg",
        quick={"steps": 1000, "eval_every": 250, "test_examples": 2000, "sweep_steps": 250},
        full={"epochs": 10, "eval_every": 1000, "sweep_steps": 1000},
        sweep_candidates=(2e-4, 2e-3, 2e-2, 2e-1),
    ),
    Experiment(
        "mlp",
        quick={"steps": 300, "eval_every": 150, "test_examples": 2000, "sweep_steps": 75},
        full={"epochs": 10, "eval_every": 1000, "sweep_steps": 1000},
        sweep_candidates=(2e-4, 2e-3, 2e-2, 2e-1),
    ),
    Experiment(
        "cnn",
        quick={
            "steps": 40,
            "eval_every": 0,
            "log_every": 2,
            "test_examples": 500,
            "sweep_steps": 10,
        },
        full={"epochs": 10, "eval_every": 2000, "sweep_steps": 1000},
        sweep_candidates=(2e-4, 2e-3, 2e-2, 2e-1),
    ),
    # Rostami & Kia (2024): Frank-Wolfe fed averaged forward gradients converges, fed the raw
    # forward gradient it stalls; backprop Frank-Wolfe is the reference. L1 ball of radius 10 for
    # the weights and for the biases; step 2/(t+2). K = 16 tangents: a single tangent's noise in
    # 7,850 dimensions outlasts this budget for averaged and raw alike (about a minute here).
    Experiment(
        "logreg",
        name="logreg-frank-wolfe",
        quick={
            **FRANK_WOLFE_DEFAULTS,
            "optimizer": FRANK_WOLFE,
            "constraint": "l1:10",
            "tangents": 16,
            "steps": 5000,
            "eval_every": 250,
            "log_every": 25,
            "test_examples": 2000,
        },
        full={
            **FRANK_WOLFE_DEFAULTS,
            "optimizer": FRANK_WOLFE,
            "constraint": "l1:10",
            "tangents": 16,
            "epochs": 10,
            "eval_every": 500,
            "log_every": 25,
        },
        sweep_candidates=(),
        runs=(
            {"estimator": "forward"},
            {"estimator": "forward", "fw_averaging": False},
            {"estimator": "backprop"},
        ),
    ),
)


def _add_reproduce(parser: argparse.ArgumentParser) -> None:
    problems = [e.name for e in EXPERIMENTS]
    parser.add_argument(
        "--out",
        type=Path,
        help="output directory (default runs/reproduce-<time>); rerun with the same --out to "
        "continue an interrupted reproduction",
    )
    parser.add_argument("--full", action="store_true", help="the paper's budget (hours)")
    parser.add_argument(
        "--problems",
        type=_csv_list(problems),
        default=problems,
        help=f"comma-separated subset (default {','.join(problems)})",
    )
    parser.add_argument(
        "--estimators",
        type=_csv_list(ESTIMATORS),
        default=list(ESTIMATORS),
        help="comma-separated (default forward,backprop,zeroth-order)",
    )
    parser.add_argument(
        "--no-sweep",
        action="store_true",
        help="skip the 'each estimator at its own tuned lr' comparison",
    )
    _add_data_flags(parser)
    _add_machine_flags(parser)


def _run_reproduce(args, context: _Context) -> int:
    out = args.out or _default_out("reproduce")
    context.resume_hint = _continue_hint(context.argv, out)
    plan = []
    for experiment in EXPERIMENTS:
        if experiment.name not in args.problems:
            continue
        values = {
            "problem": experiment.problem,
            **(experiment.full if args.full else experiment.quick),
        }
        sweep_steps = values.pop("sweep_steps", None)
        if "epochs" in values:
            values["steps"] = None
        for flag in ("dataset", "data_dir", "seed", "threads"):
            if getattr(args, flag) is not None:
                values[flag] = getattr(args, flag)
        base = TrainConfig(**values).validate()
        runs = experiment.runs or [{"estimator": name} for name in dict.fromkeys(args.estimators)]
        for overrides in runs:
            if overrides["estimator"] not in args.estimators:
                continue
            config = replace(base, **overrides)
            run_dir = out / experiment.name / _slug(_label(config))
            plan.append(_Planned(config, run_dir))
            if experiment.sweep_candidates and not args.no_sweep:
                own = run_dir.with_name(run_dir.name + "-own-lr")
                plan.append(_Planned(config, own, experiment.sweep_candidates, sweep_steps))

    run_dirs = _run_all(plan, context)
    for problem in args.problems:
        mine = [d for d in run_dirs if d.parent.name == problem]
        if mine:
            _write_reports(out / problem, mine, f"forwardgrad reproduce: {problem}")
    budget = "the paper's budget" if args.full else "quick budget"
    report = reporting.write_comparison_report(
        out, run_dirs, title=f"forwardgrad reproduce ({budget})"
    )
    print(f"report: {report}")
    return 0


def _add_plot(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="run directories, or the --out of compare/reproduce",
    )
    parser.add_argument("--out", type=Path, help="where a comparison report goes")


def _run_plot(args, context: _Context) -> int:
    try:
        written = reporting.plot_runs(args.run_dirs, args.out)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    for path in written:
        print(f"report: {path}")
    return 0


def _add_bench(parser: argparse.ArgumentParser) -> None:
    from forwardgrad import bench

    bench.add_arguments(parser)


def _run_bench(args, context: _Context) -> int:
    from forwardgrad import bench

    config = bench.config_from_args(args)
    say = (lambda line: print(f"{PROG}: {line}", file=sys.stderr)) if context.speaks else None
    results = bench.run_benchmark(config, progress=say)
    json_path, md_path = bench.write_results(results, args.out)
    print(bench.to_markdown(results))
    print(f"wrote {json_path} and {md_path}")
    return 0


@dataclass(frozen=True)
class Command:
    """A subcommand: its help line, a function adding its flags and one running it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, _Context], int]


COMMANDS: dict[str, Command] = {
    "train": Command("train one estimator on one problem", _add_train, _run_train),
    "compare": Command(
        "several estimators on one problem, same seed and data order, one report",
        _add_compare,
        _run_compare,
    ),
    "reproduce": Command(
        "every experiment of the paper (about 10 minutes on 2 cores; --full: the paper's budget)",
        _add_reproduce,
        _run_reproduce,
    ),
    "plot": Command("redraw plots and reports from the logs", _add_plot, _run_plot),
    "bench": Command(
        "time and peak memory of forward gradients against backprop (--quick: about a minute)",
        _add_bench,
        _run_bench,
    ),
}


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


def _warning_printer(default: Callable) -> Callable:
    """Our own warnings (a skipped checkpoint, ...) as one line; others as Python shows them."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, CheckpointWarning):
            print(f"{PROG}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)

    display = ProgressDisplay(mode="none" if getattr(args, "quiet", False) else "auto")
    context = _Context(
        argv=[PROG, *argv], display=display, download=not getattr(args, "no_download", False)
    )
    with warnings.catch_warnings():
        warnings.showwarning = _warning_printer(warnings.showwarning)
        try:
            return _run_command(args, context)
        except TrainingInterrupted as stop:
            display.close()
            if not context.speaks:
                return 128 + stop.signal_number
            if stop.checkpoint is None:
                message = "interrupted before a checkpoint could be written; rerun to start again."
            else:
                message = (
                    f"interrupted after step {stop.step}, checkpoint saved; continue with: "
                    + (context.resume_hint or f"{PROG} train --resume {stop.run_dir}")
                )
            print(f"{PROG}: {message}", file=sys.stderr)
            return 128 + stop.signal_number
        except KeyboardInterrupt:
            display.close()
            print(f"{PROG}: interrupted; no checkpoint was written.", file=sys.stderr)
            return 128 + signal.SIGINT
        except TrainingDiverged as error:
            display.close()
            if context.speaks:
                print(f"{PROG}: {error}", file=sys.stderr)
            return EXIT_DIVERGED
        except DistributedError as error:  # each rank says what it saw
            display.close()
            print(f"{PROG}: error: {error}", file=sys.stderr)
            return EXIT_DISTRIBUTED
        except (UsageError, CheckpointError, DataError, ValueError, TypeError) as error:
            display.close()
            if context.speaks:
                print(f"{PROG}: error: {error}", file=sys.stderr)
            return EXIT_USAGE
        finally:
            display.close()


def _run_command(args: argparse.Namespace, context: _Context) -> int:
    """Run the subcommand; under torchrun, ``train`` as this rank of a data-parallel job."""
    if detect_launch() is None:
        return COMMANDS[args.command].run(args, context)
    if args.command != "train":
        raise UsageError(
            f"only 'train' runs distributed under torchrun; run '{args.command}' as one process."
        )
    with process_group(backend="gloo") as world:  # training runs on the CPU
        context.world = world
        if not world.is_main:
            context.display.mode = "none"
        return COMMANDS[args.command].run(args, context)


if __name__ == "__main__":
    sys.exit(main())
