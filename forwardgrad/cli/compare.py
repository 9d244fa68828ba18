"""``forwardgrad compare`` (several estimators on one problem) and ``forwardgrad reproduce``
(every experiment of the paper): runs planned side by side, then one report."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from forwardgrad import reporting
from forwardgrad.cli.flags import (
    DEFAULT_THREADS,
    add_data_flags,
    add_estimators_flag,
    add_machine_flags,
    add_run_flags,
    config_from_args,
    names,
)
from forwardgrad.cli.runs import (
    Context,
    Planned,
    continue_hint,
    default_out,
    run_all,
    time_steps,
    write_reports,
)
from forwardgrad.experiments import paper
from forwardgrad.experiments.config import TrainConfig
from forwardgrad.experiments.labels import run_directory_name


def add_compare(parser: argparse.ArgumentParser) -> None:
    add_run_flags(parser, single_estimator=False)
    parser.add_argument(
        "--out",
        type=Path,
        help="comparison directory, one run directory per estimator (default "
        "runs/compare-<time>); rerun with the same --out to continue an interrupted comparison",
    )


def run_compare(args: argparse.Namespace, context: Context) -> int:
    base = config_from_args(args)
    out = args.out or default_out(f"compare-{base.problem}")
    context.resume_hint = continue_hint(context.argv, out)
    averaging = (True, False) if args.averaging == "both" else (base.fw_averaging,)
    plan = []
    for name in dict.fromkeys(args.estimators):
        for fw_averaging in averaging:
            config = replace(base, estimator=name, fw_averaging=fw_averaging)
            if args.lr_sweep:
                run_dir = out / (run_directory_name(config) + "-own-lr")
                plan.append(Planned(config, run_dir, args.lr_sweep, args.sweep_steps))
            else:
                plan.append(Planned(config, out / run_directory_name(config)))
    run_dirs = run_all(plan, context)
    time_steps(run_dirs, context)
    report = write_reports(out, run_dirs, f"forwardgrad compare: {base.problem}")
    print(f"report: {report}")
    return 0


def add_reproduce(parser: argparse.ArgumentParser) -> None:
    problems = [experiment.name for experiment in paper.EXPERIMENTS]
    parser.add_argument(
        "--out",
        type=Path,
        help="output directory (default runs/reproduce-<time>); rerun with the same --out to "
        "continue an interrupted reproduction",
    )
    parser.add_argument("--full", action="store_true", help="the paper's budget (hours)")
    parser.add_argument(
        "--problems",
        type=names(problems),
        default=problems,
        help=f"comma-separated subset (default {','.join(problems)})",
    )
    add_estimators_flag(parser)
    parser.add_argument(
        "--no-sweep",
        action="store_true",
        help="skip the 'each estimator at its own tuned lr' comparison",
    )
    add_data_flags(parser)
    add_machine_flags(parser)


def _reproduce_plan(args: argparse.Namespace, out: Path) -> list[Planned]:
    """Every run of the chosen experiments: at the paper's lr, then at each one's own lr."""
    plan = []
    for experiment in paper.EXPERIMENTS:
        if experiment.name not in args.problems:
            continue
        values, sweep_steps = experiment.settings(args.full)
        values["threads"] = DEFAULT_THREADS
        for flag in ("dataset", "data_dir", "seed", "threads"):
            if getattr(args, flag) is not None:
                values[flag] = getattr(args, flag)
        base = TrainConfig(**values).validate()
        for overrides in experiment.run_settings(args.estimators):
            config = replace(base, **overrides)
            run_dir = out / experiment.name / run_directory_name(config)
            plan.append(Planned(config, run_dir))
            if experiment.sweep_candidates and not args.no_sweep:
                own = run_dir.with_name(run_dir.name + "-own-lr")
                plan.append(Planned(config, own, experiment.sweep_candidates, sweep_steps))
    return plan


def run_reproduce(args: argparse.Namespace, context: Context) -> int:
    out = args.out or default_out("reproduce")
    context.resume_hint = continue_hint(context.argv, out)
    run_dirs = run_all(_reproduce_plan(args, out), context)
    time_steps(run_dirs, context)
    for problem in args.problems:
        mine = [d for d in run_dirs if d.parent.name == problem]
        if mine:
            write_reports(out / problem, mine, f"forwardgrad reproduce: {problem}")
    budget = "the paper's budget" if args.full else "quick budget"
    report = reporting.write_comparison_report(
        out, run_dirs, title=f"forwardgrad reproduce ({budget})"
    )
    print(f"report: {report}")
    return 0
