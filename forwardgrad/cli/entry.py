"""``main``: parse, run the subcommand, and turn how it ended into an exit code and one line."""

from __future__ import annotations

import signal
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence

from forwardgrad.cli.commands import COMMANDS, build_parser
from forwardgrad.cli.flags import UsageError
from forwardgrad.cli.progress import ProgressDisplay
from forwardgrad.cli.runs import PROG, Context
from forwardgrad.distributed import detect_launch, process_group
from forwardgrad.errors import DistributedError, ForwardGradError
from forwardgrad.experiments.datasets import FILES, DataMissing
from forwardgrad.experiments.loop import CheckpointWarning, TrainingDiverged, TrainingInterrupted

EXIT_DIVERGED = 1
EXIT_USAGE = 2
EXIT_DISTRIBUTED = 3


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see ``forwardgrad.cli``).

    forwardgrad's own errors (``ForwardGradError``) end in one line on stderr; any other
    exception is a bug and propagates with its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)

    display = ProgressDisplay(mode="none" if getattr(args, "quiet", False) else "auto")
    context = Context(
        argv=[PROG, *argv], display=display, download=not getattr(args, "no_download", False)
    )
    with warnings.catch_warnings():
        warnings.showwarning = _warning_printer(warnings.showwarning)
        try:
            return _run_command(args, context)
        except TrainingInterrupted as stop:
            return _interrupted(stop, context)
        except KeyboardInterrupt:
            display.close()
            print(f"{PROG}: interrupted; no checkpoint was written.", file=sys.stderr)
            return 128 + signal.SIGINT
        except TrainingDiverged as error:
            return _say(error, context, EXIT_DIVERGED, prefix="")
        except DataMissing as error:
            return _say(data_missing(error), context, EXIT_USAGE)
        except DistributedError as error:  # each rank says what it saw
            return _say(error, context, EXIT_DISTRIBUTED, every_rank=True)
        except ForwardGradError as error:
            return _say(error, context, EXIT_USAGE)
        finally:
            display.close()


def data_missing(error: DataMissing) -> str:
    """The missing-data message in the command line's words (its flags), on short lines."""
    why = "--no-download was given" if error.offline else "downloading failed"
    files = ", ".join(FILES[:-1]) + " and " + FILES[-1]
    lines = [
        f"{error.name} data not found ({why}); looked in:",
        f"  {error.directory}",
        *textwrap.wrap(
            f"Put {files} (raw or .gz) there, or give --data-dir DIR (or set "
            "FORWARDGRAD_DATA_DIR) for the folder that holds them.",
            width=88,
            initial_indent="  ",
            subsequent_indent="  ",
        ),
    ]
    if not error.offline:
        lines.append(f"  Download errors: {error.reason[:300]}")
    return "\n".join(lines)


def _say(
    error: Exception, context: Context, code: int, prefix: str = "error: ", every_rank=False
) -> int:
    context.display.close()
    if context.speaks or every_rank:
        print(f"{PROG}: {prefix}{error}", file=sys.stderr)
    return code


def _interrupted(stop: TrainingInterrupted, context: Context) -> int:
    context.display.close()
    if context.speaks:
        if stop.checkpoint is None:
            message = "interrupted before a checkpoint could be written; rerun to start again."
        else:
            message = f"interrupted after step {stop.step}, checkpoint saved; continue with: " + (
                context.resume_hint or f"{PROG} train --resume {stop.run_dir}"
            )
        print(f"{PROG}: {message}", file=sys.stderr)
    return 128 + stop.signal_number


def _warning_printer(default: Callable) -> Callable:
    """Our own warnings (a skipped checkpoint, ...) as one line; others as Python shows them."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, CheckpointWarning):
            print(f"{PROG}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def _run_command(args, context: Context) -> int:
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
