"""Running the runs a command plans: learning-rate sweeps first where asked, runs already on disk
kept or resumed, a diverged run reported and the rest carried on, then the reports."""

from __future__ import annotations

import math
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from forwardgrad import reporting
from forwardgrad.cli.flags import UsageError
from forwardgrad.cli.progress import ProgressDisplay
from forwardgrad.distributed import World
from forwardgrad.errors import ForwardGradError
from forwardgrad.experiments.callbacks import Progress
from forwardgrad.experiments.checkpoints import list_checkpoints
from forwardgrad.experiments.config import TrainConfig, load_config
from forwardgrad.experiments.datasets import load_dataset
from forwardgrad.experiments.files import write_json
from forwardgrad.experiments.labels import run_label
from forwardgrad.experiments.loop import TrainingDiverged, train
from forwardgrad.experiments.rundir import read_json_object
from forwardgrad.experiments.schema import CHECKPOINT_DIR, CONFIG_FILE, LR_SWEEP_FILE, SUMMARY_FILE
from forwardgrad.experiments.step_memory import step_peak_bytes
from forwardgrad.experiments.step_timing import STEP_TIMING_FILE, time_runs
from forwardgrad.experiments.sweep import sweep_learning_rate

PROG = "forwardgrad"


@dataclass
class Context:
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
class Planned:
    """One run of a comparison; with ``candidates``, its lr is chosen by a sweep first."""

    config: TrainConfig
    run_dir: Path
    candidates: Sequence[float] | None = None
    sweep_steps: int | None = None


def default_out(kind: str) -> Path:
    """``runs/<kind>-<time>``: where a command writes when ``--out`` is not given."""
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def continue_hint(argv: Sequence[str], out: Path) -> str:
    """The command again, with ``--out`` set, which continues an interrupted comparison."""
    argv = list(argv)
    if "--out" not in argv and not any(arg.startswith("--out=") for arg in argv):
        argv += ["--out", str(out)]
    return shlex.join(argv)


def sweep(
    config: TrainConfig, candidates: Sequence[float], steps: int | None, context: Context
) -> tuple[list[float], dict]:
    """Run the lr sweep for ``config``: the candidates that did not diverge, best first (the
    full run falls back to the next one if the best diverges), and the sweep's record."""
    steps = steps or max(1, (config.steps or 1000) // 4)
    result = sweep_learning_rate(
        config, candidates, steps=steps, progress=_ends_only(context), download=context.download
    )
    context.display.note(
        f"{run_label(config)}: the lr sweep chose {result.best_lr:g} "
        f"(of {', '.join(f'{lr:g}' for lr in candidates)}; {result.criterion})"
    )
    ranked = sorted(result.scores, key=lambda lr: (result.scores[lr], lr))
    ranked = [lr for lr in ranked if math.isfinite(result.scores[lr])] or [result.best_lr]
    return ranked, {**result.record(steps), "diverged_in_full_run": []}


def _ends_only(context: Context) -> Callable[[Progress], None]:
    """Progress of sweep candidates: as plain lines, only where each starts and ends (a
    reproduction would otherwise print ten lines per candidate); a bar shows everything."""
    display = context.display

    def show(event: Progress) -> None:
        if display.mode != "lines" or event.train_loss is None or event.step >= event.total_steps:
            display(event)

    return show


def _train_tuned(planned: Planned, context: Context) -> dict:
    """Sweep, then train at the best lr; if the full run diverges, again at the next candidate.
    ``lr_sweep.json`` is written in every case once the run directory exists."""
    config, run_dir = planned.config, planned.run_dir
    ranked, record = sweep(config, planned.candidates, planned.sweep_steps, context)
    for lr in ranked:
        record["used_lr"] = lr
        try:
            return train(
                replace(config, lr=lr, lr_selected_by="sweep"),
                run_dir,
                context.display,
                download=context.download,
                command=context.argv,
            ).summary
        except TrainingDiverged as error:
            record["diverged_in_full_run"].append({"lr": lr, "step": error.step})
            if lr == ranked[-1]:
                raise
            context.display.note(
                f"{run_label(config)}: diverged at step {error.step} with lr {lr:g}; "
                f"training again with the next candidate, {ranked[ranked.index(lr) + 1]:g}"
            )
            shutil.rmtree(run_dir)
        finally:
            if (run_dir / CONFIG_FILE).is_file():
                write_sweep_record(run_dir, record)
    raise AssertionError("unreachable: the last candidate returns or raises")


def write_sweep_record(run_dir: Path, record: dict) -> None:
    """``lr_sweep.json``: how the run's learning rate was chosen."""
    write_json(run_dir / LR_SWEEP_FILE, record)


# Fields that may differ between a planned run and the run found on disk without changing what
# the run computes (threads are resolved when training starts).
_IRRELEVANT = {"data_dir", "threads", "eval_every", "log_every", "checkpoint_every"}


def _same_settings(config: TrainConfig, run_dir: Path, tuned: bool) -> bool:
    stored = read_json_object(run_dir / CONFIG_FILE)
    skip = set(_IRRELEVANT)
    if tuned:
        skip |= {"lr", "lr_selected_by"}
    if config.epochs is not None:
        skip.add("steps")
    # A field newer than the stored run (e.g. constraint) counts as its default there.
    defaults = asdict(TrainConfig())
    return all(stored.get(k, defaults[k]) == v for k, v in asdict(config).items() if k not in skip)


def _run_or_continue(planned: Planned, context: Context) -> Path:
    """Train into the planned run directory, or keep the run already there if it has the same
    settings: a finished one is kept, an interrupted one resumed. So rerunning an interrupted
    ``compare`` or ``reproduce`` with the same flags and ``--out`` continues it."""
    config, run_dir, tuned = planned.config, planned.run_dir, planned.candidates is not None
    if (run_dir / CONFIG_FILE).is_file():
        if not _same_settings(config, run_dir, tuned):
            raise UsageError(
                f"{run_dir} holds a run with other settings; choose another --out or delete it."
            )
        if not (run_dir / SUMMARY_FILE).is_file():
            stored = replace(load_config(run_dir), data_dir=config.data_dir)
            train(stored, run_dir, context.display, resume=True, download=context.download)
        context.display.note(closing_line(read_json_object(run_dir / SUMMARY_FILE)))
        return run_dir
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise UsageError(f"{run_dir} holds files but no run; choose another --out or delete it.")
    if tuned:
        summary = _train_tuned(planned, context)
    else:
        result = train(
            config, run_dir, context.display, download=context.download, command=context.argv
        )
        summary = result.summary
    context.display.note(closing_line(summary))
    keep_latest_checkpoint(run_dir)
    return run_dir


def keep_latest_checkpoint(run_dir: Path) -> None:
    """Delete a finished run's checkpoints but the newest: only a resume would read one, and
    it reads the newest (a quick ``reproduce`` otherwise keeps hundreds of MB of them)."""
    for _, path in list_checkpoints(run_dir / CHECKPOINT_DIR)[1:]:
        path.unlink(missing_ok=True)


def closing_line(summary: dict) -> str:
    """A finished run's final figures, from its summary (after the final evaluation)."""
    parts = [f"{summary.get('label')}: done after {summary.get('steps')} steps"]
    figures = (
        ("final_train_loss", "train loss", ".4g"),
        ("final_test_loss", "test loss", ".4g"),
        ("final_test_accuracy", "test accuracy", ".3f"),
        ("final_distance_to_optimum", "distance to optimum", ".3g"),
    )
    for key, name, spec in figures:
        if summary.get(key) is not None:
            parts.append(f"{name} {summary[key]:{spec}}")
    return ", ".join(parts)


def run_all(plan: Sequence[Planned], context: Context) -> list[Path]:
    """Run every planned run in order; a diverged run is reported, kept, and the rest go on."""
    # Check every setting and data set before the first run starts, not an hour into it.
    checked = set()
    for planned in plan:
        config = planned.config.validate()
        if config.dataset is not None and (config.dataset, config.data_dir) not in checked:
            load_dataset(config.dataset, config.data_dir, context.download)
            checked.add((config.dataset, config.data_dir))
    done = []
    for index, planned in enumerate(plan, start=1):
        context.display.start_run(index, len(plan), planned.config.problem)
        try:
            done.append(_run_or_continue(planned, context))
        except TrainingDiverged as error:
            context.display.close()
            print(f"{PROG}: warning: {planned.run_dir}: {error}", file=sys.stderr)
            done.append(planned.run_dir)
        context.display.close()
        context.display.end_run()
    return done


def time_steps(run_dirs: Sequence[Path], context: Context) -> None:
    """``step_timing.json`` beside each group of compared runs: single steps of every run
    alternated in one process, so that their time ratios see the same load."""
    groups: dict[Path, list[Path]] = {}
    for run_dir in run_dirs:
        if (run_dir / CONFIG_FILE).is_file():
            groups.setdefault(run_dir.parent, []).append(run_dir)
    for parent, group in groups.items():
        if context.speaks and context.display.mode != "none":
            print(
                f"{PROG}: timing {len(group)} runs in {parent}: single steps alternated "
                "(up to about 30 s), then one step's peak memory each",
                file=sys.stderr,
                flush=True,
            )
        try:
            timing = time_runs(group, download=context.download)
        except ForwardGradError as error:  # e.g. a run of settings this version cannot build
            print(f"{PROG}: warning: {parent}: steps not timed: {error}", file=sys.stderr)
            (parent / STEP_TIMING_FILE).unlink(missing_ok=True)  # not an earlier one's figures
            continue
        for run_dir in group:  # a fresh process each, as the benchmark measures memory
            if not load_config(run_dir).is_test_function:
                peak = step_peak_bytes(run_dir, download=context.download)
                timing["runs"][run_dir.name]["step_peak_bytes"] = peak
        write_json(parent / STEP_TIMING_FILE, timing)


def write_reports(out: Path, run_dirs: Sequence[Path], title: str) -> Path:
    """Each run's report, and the comparison's in ``out``; returns the comparison's."""
    for run_dir in run_dirs:
        reporting.write_run_report(run_dir)
    return reporting.write_comparison_report(out, run_dirs, title=title)
