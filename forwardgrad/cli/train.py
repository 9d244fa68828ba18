"""``forwardgrad train``: one estimator on one problem, new or resumed, on one process or as one
rank of a data-parallel job under torchrun."""

from __future__ import annotations

import argparse
import os
import shlex
from dataclasses import replace
from pathlib import Path

from forwardgrad import reporting
from forwardgrad.cli.flags import UsageError, add_run_flags, config_from_args
from forwardgrad.cli.runs import PROG, Context, default_out, sweep, write_sweep_record
from forwardgrad.errors import ForwardGradError
from forwardgrad.experiments.config import TrainConfig, load_config
from forwardgrad.experiments.loop import TrainResult, train
from forwardgrad.reporting.runs import format_number


def add_train(parser: argparse.ArgumentParser) -> None:
    add_run_flags(parser, single_estimator=True)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="new run directory (default runs/train-<time>)")
    where.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue RUN_DIR from its last checkpoint with its own settings "
        "(--steps/--epochs may extend it, --data-dir may move the data)",
    )


def run_train(args: argparse.Namespace, context: Context) -> int:
    result = _resume(args, context) if args.resume is not None else _start(args, context)
    context.display.close()
    if not context.speaks:
        return 0
    report = reporting.write_run_report(result.run_dir)
    summary = result.summary
    line = f"{summary['label']} on {summary['problem']}: final train loss "
    line += format_number(summary["final_train_loss"], ".4g", missing="n/a")
    if summary["final_test_accuracy"] is not None:
        line += ", test accuracy " + format_number(summary["final_test_accuracy"], ".4f")
    print(f"{line}\nreport: {report}")
    return 0


def _resume(args: argparse.Namespace, context: Context) -> TrainResult:
    """Continue ``--resume RUN_DIR`` with its own settings (steps and data dir may change)."""
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
    return _train(config, run_dir, context, resume=True)


def _start(args: argparse.Namespace, context: Context) -> TrainResult:
    """A new run from the flags; under torchrun --max-restarts, a restarted rank resumes it."""
    config = config_from_args(args)
    run_dir, resume = _run_dir(args, config, context)
    record = None
    if args.lr_sweep:
        if not resume and run_dir.is_dir() and any(run_dir.iterdir()):  # before, not after
            raise UsageError(f"{run_dir} already holds files; choose another --out.")
        ranked, record = sweep(config, args.lr_sweep, args.sweep_steps, context)
        config = replace(config, lr=ranked[0], lr_selected_by="sweep")
        record["used_lr"] = ranked[0]
    created = _missing_directories(run_dir)
    try:
        result = _train(config, run_dir, context, resume, command=context.argv)
    except ForwardGradError:
        # A run that failed to start leaves no empty directory behind (nor its new parents).
        for directory in created:
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
        raise
    finally:
        if record is not None and context.speaks and (run_dir / "config.json").is_file():
            write_sweep_record(run_dir, record)
    return result


def _missing_directories(run_dir: Path) -> list[Path]:
    """``run_dir`` and its parents that do not exist yet, deepest first (a path the system
    cannot even look up, e.g. a name too long, is left for ``train`` to refuse)."""
    missing = []
    for directory in (run_dir, *run_dir.parents):
        try:
            if directory.exists():
                break
        except OSError:
            return []
        missing.append(directory)
    return missing


def _train(
    config: TrainConfig,
    run_dir: Path,
    context: Context,
    resume: bool,
    command: list[str] | None = None,
) -> TrainResult:
    context.resume_hint = f"{PROG} train --resume {shlex.quote(str(run_dir))}"
    try:
        return train(
            config,
            run_dir,
            context.display,
            resume=resume,
            download=context.download,
            command=command,
            world=context.world,
        )
    except (OSError, KeyboardInterrupt):  # os.path.isfile is False for an unusable path
        if not os.path.isfile(run_dir / "config.json"):  # nothing to resume: rerun the command
            context.resume_hint = shlex.join(context.argv)
        raise


def _run_dir(args: argparse.Namespace, config: TrainConfig, context: Context) -> tuple[Path, bool]:
    """The run directory, and whether to resume it: every rank takes rank 0's directory and
    decision, and after a restart by torchrun --max-restarts continues from its checkpoint."""
    run_dir = args.out or default_out(f"train-{config.problem}-{config.estimator}")
    if context.world is None:
        return run_dir, False
    restarted = context.world.restart_count > 0 and (run_dir / "config.json").is_file()
    return context.world.broadcast_object((run_dir, restarted), "agreeing on the run directory")
