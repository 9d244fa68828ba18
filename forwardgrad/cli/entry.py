"""``main``: parse, run the subcommand, and turn how it ended into an exit code and one line."""

from __future__ import annotations

import contextlib
import errno
import signal
import sys
import textwrap
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence

from forwardgrad.cli.commands import COMMANDS, build_parser
from forwardgrad.cli.flags import UsageError
from forwardgrad.cli.progress import ProgressDisplay
from forwardgrad.cli.runs import PROG, Context
from forwardgrad.distributed import detect_launch, end_rank, process_group
from forwardgrad.errors import DistributedError, ForwardGradError
from forwardgrad.experiments.callbacks import Terminated
from forwardgrad.experiments.datasets import FILES, DataMissing
from forwardgrad.experiments.loop import CheckpointWarning, TrainingDiverged, TrainingInterrupted
from forwardgrad.experiments.runstate import raise_for_signal

EXIT_DIVERGED = 1
EXIT_USAGE = 2
EXIT_DISTRIBUTED = 3


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see ``forwardgrad.cli``).

    forwardgrad's own errors (``ForwardGradError``) end in one line on stderr; any other
    exception is a bug and propagates with its traceback. From here to the last line, SIGINT
    and SIGTERM end the command with 130 or 143 and one line (the training loop defers them to
    the end of a step, to checkpoint first).
    """
    whole_process = argv is None  # not a call from Python code, which gets its handlers back
    argv = list(sys.argv[1:] if argv is None else argv)
    with _signals_stop_the_command(whole_process):
        try:
            code = _main(argv)
        except KeyboardInterrupt as interrupt:  # while parsing, before anything ran
            code = _stopped(interrupt, None)
    if whole_process and detect_launch() is not None:
        end_rank(code)
    return code


def _main(argv: list[str]) -> int:
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
        except KeyboardInterrupt as interrupt:  # outside the training loop
            return _stopped(interrupt, context)
        except TrainingDiverged as error:
            return _say(error, context, EXIT_DIVERGED, prefix="")
        except DataMissing as error:
            return _say(data_missing(error), context, EXIT_USAGE)
        except DistributedError as error:  # each rank says what it saw
            return _say(error, context, EXIT_DISTRIBUTED, every_rank=True)
        except ForwardGradError as error:
            return _say(error, context, EXIT_USAGE)
        except OSError as error:  # the file system refused: a bad path, a full disk
            return _file_system_error(error, context)
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


@contextlib.contextmanager
def _signals_stop_the_command(whole_process: bool) -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt and SIGTERM ``Terminated`` (instead of killing the process
    silently), until the command ends; only the main thread can catch signals.

    When the command is the whole process, SIGINT and SIGTERM are then ignored, so the process
    ends with the code the command chose even if one arrives while Python shuts down (torchrun
    sends SIGTERM to the other ranks as soon as one fails, which would turn their 3 into -15).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    numbers = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.signal(number, raise_for_signal) for number in numbers}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_IGN if whole_process else handler)


def _stopped(interrupt: KeyboardInterrupt, context: Context | None) -> int:
    """One line for a signal outside the training loop: what to run to continue, if anything."""
    number = signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
    if context is not None:
        context.display.close()
    if context is None or context.speaks:
        hint = context.resume_hint if context is not None else ""
        advice = f"; continue with: {hint}" if hint else ""
        print(f"{PROG}: interrupted by {signal.Signals(number).name}{advice}.", file=sys.stderr)
    return 128 + number


def _say(
    error: Exception, context: Context, code: int, prefix: str = "error: ", every_rank=False
) -> int:
    context.display.close()
    if context.speaks or every_rank:
        print(f"{PROG}: {prefix}{error}", file=sys.stderr)
    return code


# A path or permission problem is a bad argument (2); running out of space or a failing disk is
# the run failing midway (1): whatever was written before is intact, so the run can continue.
_OUT_OF_SPACE = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EIO}


def _file_system_error(error: OSError, context: Context) -> int:
    where = f"{error.filename}: " if error.filename else "the file system refused a write: "
    message = f"{where}{error.strerror or error}"
    if error.errno not in _OUT_OF_SPACE:
        advice = "; choose another path." if error.filename else "."
        return _say(f"{message}{advice}", context, EXIT_USAGE)
    resume = context.resume_hint
    advice = f"; free some space, then continue with: {resume}" if resume else "; free some space."
    return _say(f"{message}{advice}", context, EXIT_DIVERGED)


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
